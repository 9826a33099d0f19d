//! Records and batches: records are pre-encoded JSON objects; batches close on a record count
//! or a byte budget, whichever comes first.

use std::collections::HashSet;

use bytes::Bytes;

use crate::contract::Op;

/// One record to deliver.
#[derive(Debug, Clone)]
pub struct Record {
    /// The value of the record's key field, if the object has one (for rejects and deletes).
    pub key: Option<String>,
    /// The record as a JSON object.
    pub json: Bytes,
    /// What the record asks of the destination.
    pub op: Op,
    /// In a sync, the diff's change this record carries (reported back when acknowledged).
    pub change: Option<u32>,
}

impl Record {
    /// A record to upsert outside a sync.
    pub fn new(key: Option<String>, json: Bytes) -> Self {
        Self {
            key,
            json,
            op: Op::Upsert,
            change: None,
        }
    }
}

/// A request's worth of records.
#[derive(Debug, Clone)]
pub struct Batch {
    /// The operation of every record in it (a batch never mixes operations).
    pub op: Op,
    /// Sequence number of the batch within the statement (1-based).
    pub seq: u64,
    /// 0 for the batch as first sent; n for the n-th subset re-sent after a partial failure.
    pub part: u32,
    /// Stable across retries of the same request: the basis of the idempotency key.
    pub id: String,
    pub records: Vec<Record>,
    /// The records' JSON sizes, each with its separator.
    pub bytes: usize,
}

impl Batch {
    /// Appends the batch's records as a JSON array (`[r1,r2,…]`), as encoded: no re-parsing.
    pub fn write_json_array(&self, out: &mut Vec<u8>) {
        out.push(b'[');
        for (i, record) in self.records.iter().enumerate() {
            if i > 0 {
                out.push(b',');
            }
            out.extend_from_slice(&record.json);
        }
        out.push(b']');
    }

    /// The idempotency key of this request: the same for every retry of it, different for a
    /// subset re-sent after a partial failure (whose content differs).
    pub fn idempotency_key(&self) -> String {
        if self.part == 0 {
            self.id.clone()
        } else {
            format!("{}.{}", self.id, self.part)
        }
    }

    /// The records at `indexes`, as the next part of this batch.
    pub fn subset(&self, indexes: &[usize], part: u32) -> Batch {
        let records: Vec<Record> = indexes
            .iter()
            .filter_map(|&i| self.records.get(i).cloned())
            .collect();
        Batch {
            op: self.op,
            seq: self.seq,
            part,
            id: self.id.clone(),
            bytes: records.iter().map(|r| r.json.len() + 1).sum(),
            records,
        }
    }
}

/// Groups records into batches of at most `max_records` records and `max_bytes` bytes, one
/// operation per batch.
#[derive(Debug)]
pub struct Batcher {
    run_id: String,
    max_records: usize,
    max_bytes: usize,
    seq: u64,
    pending: [(Vec<Record>, usize); 4],
    /// Destinations that fail a request holding one key twice (HubSpot, Salesforce): how a key
    /// compares there, and the keys of each pending batch.
    unique_keys: Option<UniqueKeys>,
}

/// How keys compare at the destination, and the keys of each operation's pending batch.
#[derive(Debug)]
struct UniqueKeys {
    normalize: fn(&str) -> String,
    seen: [HashSet<String>; 4],
}

impl Batcher {
    pub fn new(run_id: &str, max_records: usize, max_bytes: usize) -> Self {
        Self {
            run_id: run_id.to_string(),
            max_records: max_records.max(1),
            max_bytes: max_bytes.max(1),
            seq: 0,
            pending: Default::default(),
            unique_keys: None,
        }
    }

    /// Never puts two records whose keys compare equal under `normalize` in one batch: the
    /// second closes the batch and starts the next (both are sent, in order).
    pub fn with_unique_keys(mut self, normalize: fn(&str) -> String) -> Self {
        self.unique_keys = Some(UniqueKeys {
            normalize,
            seen: Default::default(),
        });
        self
    }

    /// Adds a record; returns a full batch when this record closes one. A record larger than
    /// the byte budget travels alone. Each record counts its separator too.
    pub fn push(&mut self, record: Record) -> Option<Batch> {
        let op = record.op;
        let size = record.json.len() + 1;
        let mut full = None;
        let slot = op.code() as usize;
        let repeated = match (&mut self.unique_keys, &record.key) {
            (Some(u), Some(key)) => !u.seen[slot].insert((u.normalize)(key)),
            _ => false,
        };
        let (records, bytes) = &self.pending[slot];
        if !records.is_empty() && (repeated || bytes + size > self.max_bytes) {
            full = self.take(op);
            if let (Some(u), Some(key)) = (&mut self.unique_keys, &record.key) {
                u.seen[slot].insert((u.normalize)(key));
            }
        }
        let (records, bytes) = &mut self.pending[op.code() as usize];
        *bytes += size;
        records.push(record);
        if records.len() >= self.max_records {
            debug_assert!(full.is_none());
            return self.take(op);
        }
        full
    }

    /// The last, partial batches (one per operation that has records left).
    pub fn finish(&mut self) -> Vec<Batch> {
        Op::ALL.iter().filter_map(|op| self.take(*op)).collect()
    }

    fn take(&mut self, op: Op) -> Option<Batch> {
        let (records, bytes) = &mut self.pending[op.code() as usize];
        if records.is_empty() {
            return None;
        }
        if let Some(u) = &mut self.unique_keys {
            u.seen[op.code() as usize].clear();
        }
        self.seq += 1;
        let records = std::mem::take(records);
        let bytes = std::mem::take(bytes);
        let id = match op {
            Op::Upsert => format!("{}-{:06}", self.run_id, self.seq),
            op => format!("{}-{op}-{:06}", self.run_id, self.seq),
        };
        Some(Batch {
            op,
            seq: self.seq,
            part: 0,
            id,
            records,
            bytes,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(n: usize) -> Record {
        Record::new(None, Bytes::from(vec![b'x'; n]))
    }

    #[test]
    fn closes_on_count_and_on_bytes() {
        let mut b = Batcher::new("run", 3, 100);
        assert!(b.push(record(10)).is_none());
        assert!(b.push(record(10)).is_none());
        let full = b.push(record(10)).unwrap();
        assert_eq!((full.seq, full.records.len(), full.bytes), (1, 3, 33));
        assert!(b.push(record(59)).is_none());
        assert!(b.push(record(39)).is_none(), "60 + 40 bytes fit in 100");
        let by_bytes = b.push(record(10)).unwrap();
        assert_eq!(
            by_bytes.records.len(),
            2,
            "a third record would exceed 100 bytes"
        );
        assert_eq!(by_bytes.bytes, 100);
        let last = b.finish();
        assert_eq!((last[0].seq, last[0].records.len()), (3, 1));
        assert!(b.finish().is_empty());
    }

    #[test]
    fn batches_never_mix_operations() {
        let mut b = Batcher::new("run", 2, 1000);
        let mut del = record(1);
        del.op = Op::Delete;
        assert!(b.push(record(1)).is_none());
        assert!(b.push(del.clone()).is_none());
        let deletes = b.push(del).unwrap();
        assert_eq!(deletes.op, Op::Delete);
        assert_eq!(deletes.idempotency_key(), "run-delete-000001");
        let rest = b.finish();
        assert_eq!(
            (rest.len(), rest[0].op, rest[0].records.len()),
            (1, Op::Upsert, 1)
        );
    }

    #[test]
    fn a_repeated_key_starts_the_next_batch() {
        let keyed = |k: &str| Record::new(Some(k.to_string()), Bytes::from_static(b"{}"));
        let mut b = Batcher::new("run", 10, 1000).with_unique_keys(|k| k.to_lowercase());
        assert!(b.push(keyed("a@x.com")).is_none());
        assert!(b.push(keyed("b@x.com")).is_none());
        let first = b
            .push(keyed("A@x.com"))
            .expect("the repeated key closes the batch");
        assert_eq!(first.records.len(), 2);
        assert!(b.push(keyed("b@x.com")).is_none(), "b is new in this batch");
        let rest = b.finish();
        let keys: Vec<_> = rest[0]
            .records
            .iter()
            .map(|r| r.key.clone().unwrap())
            .collect();
        assert_eq!(keys, ["A@x.com", "b@x.com"]);
    }

    #[test]
    fn idempotency_keys_are_stable_per_request() {
        let mut b = Batcher::new("run-1", 2, 1000);
        b.push(record(1));
        let batch = b.push(record(1)).unwrap();
        assert_eq!(batch.idempotency_key(), "run-1-000001");
        let again = batch.clone();
        assert_eq!(again.idempotency_key(), batch.idempotency_key());
        let part = batch.subset(&[1], 1);
        assert_eq!(part.idempotency_key(), "run-1-000001.1");
        assert_eq!(part.records.len(), 1);
    }
}
