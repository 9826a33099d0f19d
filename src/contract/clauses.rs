//! [`Clauses`]: which fields each clause of a write sends, and when it applies.
//!
//! In SQL, the clauses of a MERGE keep their own fields:
//!
//! ```sql
//! MERGE INTO crm.contacts AS t USING scores AS s ON t.email = s.email
//! WHEN MATCHED THEN UPDATE SET churn_score = s.churn_score
//! WHEN NOT MATCHED THEN INSERT (email, firstname, churn_score) VALUES (s.email, s.firstname, s.churn_score)
//! ```
//!
//! A new record gets the INSERT's fields; a synced record whose fields changed gets only the
//! changed fields of the UPDATE SET list, so `firstname` is set when the record is created and
//! never overwritten. A field only in INSERT is still hashed and stored with the record (a change
//! to it alone sends nothing and is remembered, so it is not found again every run).
//!
//! A clause may have a condition on the source's columns (`WHEN MATCHED AND s.score > 0.5 THEN
//! …`), evaluated per row: the model then carries one column per kind of clause,
//! [`WHEN_MATCHED_COLUMN`] and [`WHEN_NOT_MATCHED_COLUMN`], holding the index of the first clause
//! of that kind whose condition holds (null: none does, and the row is not sent).

/// The column of a conditional write's model that picks its `WHEN MATCHED` clause per row.
pub const WHEN_MATCHED_COLUMN: &str = "__when_matched";
/// The column of a conditional write's model that picks its `WHEN NOT MATCHED` clause per row.
pub const WHEN_NOT_MATCHED_COLUMN: &str = "__when_not_matched";

/// Whether `name` is one of the columns that pick a clause per row.
pub fn is_clause_column(name: &str) -> bool {
    name == WHEN_MATCHED_COLUMN || name == WHEN_NOT_MATCHED_COLUMN
}

/// One `WHEN MATCHED … UPDATE` or `WHEN NOT MATCHED … INSERT` clause.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Clause {
    /// Bit i: mapped field i is written by this clause (the match key's fields always are).
    pub fields: u64,
    /// The clause's condition as written (`s.score > 0.5`), if it has one.
    pub condition: Option<String>,
}

/// Which fields each clause sends; see the module documentation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Clauses {
    /// The `WHEN NOT MATCHED … THEN INSERT` clauses, in order.
    pub inserts: Vec<Clause>,
    /// The `WHEN MATCHED … THEN UPDATE` clauses, in order.
    pub updates: Vec<Clause>,
}

impl Default for Clauses {
    fn default() -> Self {
        Self::every_field()
    }
}

impl Clauses {
    /// An INSERT INTO (and a MERGE whose clauses list the same fields): one unconditional clause
    /// of each kind that writes every field.
    pub fn every_field() -> Self {
        let all = Clause {
            fields: u64::MAX,
            condition: None,
        };
        Self {
            inserts: vec![all.clone()],
            updates: vec![all],
        }
    }

    /// Whether some clause has a condition: the model then carries the clause columns.
    pub fn conditional(&self) -> bool {
        self.inserts
            .iter()
            .chain(&self.updates)
            .any(|c| c.condition.is_some())
    }

    /// The number of clause columns at the end of the model (0 or 2).
    pub fn columns(&self) -> usize {
        if self.conditional() { 2 } else { 0 }
    }

    /// The fields that `WHEN NOT MATCHED` clause `choice` writes (`None`: no clause applies).
    pub fn insert_fields(&self, choice: Option<u8>) -> Option<u64> {
        self.inserts.get(choice? as usize).map(|c| c.fields)
    }

    /// The fields that `WHEN MATCHED` clause `choice` may update (`None`: no clause applies).
    pub fn update_fields(&self, choice: Option<u8>) -> Option<u64> {
        self.updates.get(choice? as usize).map(|c| c.fields)
    }

    /// Whether every clause writes the same fields without a condition (an INSERT INTO, or a
    /// MERGE whose INSERT and UPDATE SET list the same fields).
    pub fn uniform(&self, all: u64) -> bool {
        !self.conditional()
            && self
                .inserts
                .iter()
                .chain(&self.updates)
                .all(|c| c.fields & all == all)
    }

    /// What EXPLAIN shows: each clause's condition and fields, e.g.
    /// `insert=[email, firstname] update when s.score > 0.5=[churn_score]`.
    pub fn describe(&self, names: &[String], key: u64) -> String {
        let listed = |mask: u64| {
            names
                .iter()
                .enumerate()
                .filter(|(i, _)| *i < 64 && mask & (1 << i) != 0 && key & (1 << i) == 0)
                .map(|(_, n)| n.as_str())
                .collect::<Vec<_>>()
                .join(", ")
        };
        let clause = |verb: &str, c: &Clause| match &c.condition {
            Some(when) => format!("{verb} when {when}=[{}]", listed(c.fields)),
            None => format!("{verb}=[{}]", listed(c.fields)),
        };
        self.inserts
            .iter()
            .map(|c| clause("insert", c))
            .chain(self.updates.iter().map(|c| clause("update", c)))
            .collect::<Vec<_>>()
            .join(" ")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn clause(fields: u64, condition: Option<&str>) -> Clause {
        Clause {
            fields,
            condition: condition.map(str::to_string),
        }
    }

    #[test]
    fn a_choice_picks_its_clause_fields_and_none_picks_nothing() {
        let clauses = Clauses {
            inserts: vec![clause(0b111, Some("s.ok")), clause(0b011, None)],
            updates: vec![clause(0b101, None)],
        };
        assert!(clauses.conditional());
        assert_eq!(clauses.columns(), 2);
        assert_eq!(clauses.insert_fields(Some(0)), Some(0b111));
        assert_eq!(clauses.insert_fields(Some(1)), Some(0b011));
        assert_eq!(clauses.insert_fields(Some(2)), None);
        assert_eq!(clauses.insert_fields(None), None);
        assert_eq!(clauses.update_fields(Some(0)), Some(0b101));
        assert!(!clauses.uniform(0b111));
        let names: Vec<String> = ["id", "a", "b"].iter().map(|s| s.to_string()).collect();
        assert_eq!(
            clauses.describe(&names, 0b001),
            "insert when s.ok=[a, b] insert=[a] update=[b]"
        );
    }

    #[test]
    fn an_insert_into_writes_every_field_in_every_clause() {
        let clauses = Clauses::every_field();
        assert!(!clauses.conditional());
        assert_eq!(clauses.columns(), 0);
        assert!(clauses.uniform(0b1111));
        assert_eq!(clauses.update_fields(Some(0)), Some(u64::MAX));
        assert!(is_clause_column(WHEN_MATCHED_COLUMN) && !is_clause_column("__op"));
    }
}
