//! [`SyncMode`]: what a write statement may do to the destination's records.

use std::fmt;

use super::Op;

/// What a write statement may do, decided once by the planner from the statement:
///
/// | statement | mode |
/// | --- | --- |
/// | `INSERT INTO` an object without a key | `Append` |
/// | `INSERT INTO` an object with a key | `Upsert` |
/// | `MERGE` with `WHEN MATCHED THEN UPDATE` and `WHEN NOT MATCHED THEN INSERT` | `Upsert` |
/// | … and `WHEN NOT MATCHED BY SOURCE THEN DELETE` | `Mirror` |
/// | `MERGE` with only `WHEN NOT MATCHED THEN INSERT` | `CreateOnly` (+ delete: `CreateAndDelete`) |
/// | `MERGE` with only `WHEN MATCHED THEN UPDATE` | `UpdateOnly` (+ delete: `UpdateAndDelete`) |
/// | `MERGE` with only `WHEN NOT MATCHED BY SOURCE THEN DELETE` | `DeleteMissing` |
/// | `DELETE FROM … WHERE key IN (…)` | `DeleteListed` |
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum SyncMode {
    /// Every row is a new record (the object has no key to match by).
    Append,
    /// New records are created, changed ones updated.
    Upsert,
    /// Upsert, and records gone from the model are deleted.
    Mirror,
    /// New records are created; changed ones are left alone.
    CreateOnly,
    /// Create-only, and records gone from the model are deleted.
    CreateAndDelete,
    /// Changed records (and records not synced yet) are updated; nothing is created.
    UpdateOnly,
    /// Update-only, and records gone from the model are deleted.
    UpdateAndDelete,
    /// Only records gone from the model are deleted.
    DeleteMissing,
    /// Every model row is the key of a record to delete.
    DeleteListed,
}

impl SyncMode {
    /// Every mode, the keyless one first.
    pub const ALL: [SyncMode; 9] = [
        SyncMode::Append,
        SyncMode::Upsert,
        SyncMode::Mirror,
        SyncMode::CreateOnly,
        SyncMode::CreateAndDelete,
        SyncMode::UpdateOnly,
        SyncMode::UpdateAndDelete,
        SyncMode::DeleteMissing,
        SyncMode::DeleteListed,
    ];

    /// The mode of a MERGE with these kinds of clause; `None` without any.
    pub fn merge(insert: bool, update: bool, delete: bool) -> Option<SyncMode> {
        Some(match (insert, update, delete) {
            (true, true, false) => SyncMode::Upsert,
            (true, true, true) => SyncMode::Mirror,
            (true, false, false) => SyncMode::CreateOnly,
            (true, false, true) => SyncMode::CreateAndDelete,
            (false, true, false) => SyncMode::UpdateOnly,
            (false, true, true) => SyncMode::UpdateAndDelete,
            (false, false, true) => SyncMode::DeleteMissing,
            (false, false, false) => return None,
        })
    }

    /// The mode once the match key is known: without one, records can only be appended.
    pub fn keyed(self, has_key: bool) -> SyncMode {
        if has_key { self } else { SyncMode::Append }
    }

    /// Whether records the destination does not have are created.
    pub fn inserts(self) -> bool {
        matches!(
            self,
            SyncMode::Append
                | SyncMode::Upsert
                | SyncMode::Mirror
                | SyncMode::CreateOnly
                | SyncMode::CreateAndDelete
        )
    }

    /// Whether records the destination has are updated when they change.
    pub fn updates(self) -> bool {
        matches!(
            self,
            SyncMode::Upsert | SyncMode::Mirror | SyncMode::UpdateOnly | SyncMode::UpdateAndDelete
        )
    }

    /// Whether synced records that left the model are deleted.
    pub fn deletes_missing(self) -> bool {
        matches!(
            self,
            SyncMode::Mirror
                | SyncMode::CreateAndDelete
                | SyncMode::UpdateAndDelete
                | SyncMode::DeleteMissing
        )
    }

    /// Whether the model lists the keys to delete (`DELETE FROM`).
    pub fn listed_deletes(self) -> bool {
        self == SyncMode::DeleteListed
    }

    /// Whether the sync deletes anything at all.
    pub fn deletes(self) -> bool {
        self.deletes_missing() || self.listed_deletes()
    }

    /// The operation for a record the destination is not known to have (`None`: not sent).
    pub fn new_op(self) -> Option<Op> {
        match self {
            SyncMode::Append | SyncMode::CreateOnly | SyncMode::CreateAndDelete => Some(Op::Insert),
            SyncMode::Upsert | SyncMode::Mirror => Some(Op::Upsert),
            SyncMode::UpdateOnly | SyncMode::UpdateAndDelete => Some(Op::Update),
            SyncMode::DeleteMissing | SyncMode::DeleteListed => None,
        }
    }

    /// The operation for a synced record whose fields changed (`None`: not sent).
    pub fn changed_op(self) -> Option<Op> {
        match (self.updates(), self.inserts()) {
            (false, _) => None,
            (true, true) => Some(Op::Upsert),
            (true, false) => Some(Op::Update),
        }
    }

    /// The statement a run of this mode reports as (`sluice.runs`, the CLI): `None` keeps the
    /// statement's own verb (`INSERT INTO` appends and upserts; a MERGE that upserts says MERGE).
    pub fn verb(self) -> Option<&'static str> {
        match self {
            SyncMode::Append | SyncMode::Upsert => None,
            SyncMode::DeleteListed => Some("DELETE FROM"),
            _ => Some("MERGE INTO"),
        }
    }

    /// The mode as users name it (EXPLAIN, `sluice.runs.mode`, dry runs).
    pub fn as_str(self) -> &'static str {
        match self {
            SyncMode::Append => "append",
            SyncMode::Upsert => "upsert",
            SyncMode::Mirror => "mirror",
            SyncMode::CreateOnly => "create-only",
            SyncMode::CreateAndDelete => "create-only+delete",
            SyncMode::UpdateOnly => "update-only",
            SyncMode::UpdateAndDelete => "update-only+delete",
            SyncMode::DeleteMissing => "delete-only",
            SyncMode::DeleteListed => "delete",
        }
    }

    /// `iud` bits of what the statement may do, part of an unnamed sync's state id (stable across
    /// versions: changing it would orphan the state of every unnamed sync).
    pub fn signature_bits(self) -> String {
        format!(
            "{}{}{}",
            self.inserts() as u8,
            // An INSERT INTO was always planned as "may update" before its key was known.
            (self.updates() || self == SyncMode::Append) as u8,
            self.deletes() as u8
        )
    }
}

impl fmt::Display for SyncMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const ALL: [SyncMode; 9] = SyncMode::ALL;

    #[test]
    fn every_merge_clause_set_is_one_mode_and_back() {
        for insert in [false, true] {
            for update in [false, true] {
                for delete in [false, true] {
                    let Some(mode) = SyncMode::merge(insert, update, delete) else {
                        assert!(!insert && !update && !delete);
                        continue;
                    };
                    assert_eq!(
                        (mode.inserts(), mode.updates(), mode.deletes_missing()),
                        (insert, update, delete),
                        "{mode}"
                    );
                    assert!(!mode.listed_deletes());
                }
            }
        }
    }

    #[test]
    fn names_are_distinct_and_modes_without_key_append() {
        let names: std::collections::HashSet<&str> = ALL.iter().map(|m| m.as_str()).collect();
        assert_eq!(names.len(), ALL.len());
        for mode in ALL {
            assert_eq!(mode.keyed(false), SyncMode::Append);
            assert_eq!(mode.keyed(true), mode);
        }
    }

    #[test]
    fn operations_follow_the_mode() {
        assert_eq!(SyncMode::Append.new_op(), Some(Op::Insert));
        assert_eq!(SyncMode::Upsert.new_op(), Some(Op::Upsert));
        assert_eq!(SyncMode::Mirror.changed_op(), Some(Op::Upsert));
        assert_eq!(SyncMode::CreateOnly.changed_op(), None);
        assert_eq!(SyncMode::UpdateOnly.new_op(), Some(Op::Update));
        assert_eq!(SyncMode::UpdateOnly.changed_op(), Some(Op::Update));
        assert_eq!(SyncMode::DeleteMissing.new_op(), None);
        assert_eq!(SyncMode::DeleteListed.new_op(), None);
        assert!(SyncMode::DeleteListed.deletes() && !SyncMode::DeleteListed.deletes_missing());
        assert_eq!(SyncMode::DeleteListed.verb(), Some("DELETE FROM"));
        assert_eq!(SyncMode::Upsert.verb(), None);
        assert_eq!(SyncMode::CreateOnly.verb(), Some("MERGE INTO"));
    }

    #[test]
    fn signatures_keep_the_state_ids_of_earlier_versions() {
        // Earlier versions wrote `{statement}:{insert}{update}{delete}` with INSERT INTO as 110
        // and DELETE FROM as 001; unnamed syncs find their state by it.
        assert_eq!(SyncMode::Upsert.signature_bits(), "110");
        assert_eq!(SyncMode::Append.signature_bits(), "110");
        assert_eq!(SyncMode::DeleteListed.signature_bits(), "001");
        assert_eq!(SyncMode::Mirror.signature_bits(), "111");
        assert_eq!(SyncMode::CreateOnly.signature_bits(), "100");
        assert_eq!(SyncMode::UpdateAndDelete.signature_bits(), "011");
        assert_eq!(SyncMode::DeleteMissing.signature_bits(), "001");
    }
}
