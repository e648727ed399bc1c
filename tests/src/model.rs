//! The model-based property test: random operation sequences against a reference model.

use std::time::Duration;

use proptest::prelude::*;
use proptest::test_runner::{Config, TestCaseError, TestRunner};
use session_core::{SessionStore, StorageKey, StoreError, Version};

use crate::cases::record_with;
use crate::new_key;

/// How many distinct keys one sequence works on.
const KEYS: usize = 3;
const TTL: Duration = Duration::from_secs(600);

/// One store operation on key number `key`.
#[derive(Clone, Debug)]
pub enum Op {
    /// `create` with a one-byte value.
    Create {
        /// Which key.
        key: usize,
        /// The value.
        value: u8,
    },
    /// `load`, checked against the model.
    Load {
        /// Which key.
        key: usize,
    },
    /// `save` with the current version, or with an older one when `stale`.
    Save {
        /// Which key.
        key: usize,
        /// The value.
        value: u8,
        /// Use a version from before the latest write.
        stale: bool,
    },
    /// `touch`.
    Touch {
        /// Which key.
        key: usize,
    },
    /// `delete`.
    Delete {
        /// Which key.
        key: usize,
    },
}

fn op() -> impl Strategy<Value = Op> {
    let key = 0..KEYS;
    prop_oneof![
        (key.clone(), any::<u8>()).prop_map(|(key, value)| Op::Create { key, value }),
        key.clone().prop_map(|key| Op::Load { key }),
        (key.clone(), any::<u8>(), any::<bool>()).prop_map(|(key, value, stale)| Op::Save {
            key,
            value,
            stale
        }),
        key.clone().prop_map(|key| Op::Touch { key }),
        key.prop_map(|key| Op::Delete { key }),
    ]
}

/// What the model knows of one key.
#[derive(Default)]
struct KeyModel {
    /// The live value and its version, if the key holds an entry.
    live: Option<(u8, Version)>,
    /// Every version the store has returned for this key, oldest first.
    history: Vec<Version>,
}

fn fail(message: String) -> TestCaseError {
    TestCaseError::fail(message)
}

async fn run_sequence<S: SessionStore>(store: &S, ops: &[Op]) -> Result<(), TestCaseError> {
    let keys: Vec<StorageKey> = (0..KEYS).map(|_| new_key()).collect();
    let mut model: Vec<KeyModel> = (0..KEYS).map(|_| KeyModel::default()).collect();
    for (step, op) in ops.iter().enumerate() {
        let at = |what: &str| format!("step {step} {op:?}: {what}");
        match *op {
            Op::Create { key, value } => {
                let result = store
                    .create(&keys[key], &record_with("v", &[value]), TTL)
                    .await;
                let m = &mut model[key];
                match (&m.live, result) {
                    (None, Ok(version)) => {
                        if m.history.contains(&version) {
                            return Err(fail(at("create reused an old version")));
                        }
                        m.live = Some((value, version));
                        m.history.push(version);
                    }
                    (Some(_), Err(StoreError::AlreadyExists)) => {}
                    (expected, got) => {
                        return Err(fail(at(&format!("model {expected:?}, store {got:?}"))));
                    }
                }
            }
            Op::Load { key } => {
                let loaded = store
                    .load(&keys[key])
                    .await
                    .map_err(|e| fail(at(&e.to_string())))?;
                let got = loaded.map(|l| (l.record, l.version));
                let expected = model[key]
                    .live
                    .map(|(value, version)| (record_with("v", &[value]), version));
                if got != expected {
                    return Err(fail(at(&format!("model {expected:?}, store {got:?}"))));
                }
            }
            Op::Save { key, value, stale } => {
                let m = &mut model[key];
                let version = match (&m.live, stale) {
                    (Some((_, current)), false) => *current,
                    (Some((_, current)), true) => {
                        match m.history.iter().rev().find(|v| *v != current) {
                            Some(older) => *older,
                            None => continue,
                        }
                    }
                    (None, _) => m
                        .history
                        .last()
                        .copied()
                        .unwrap_or(Version::new(u64::MAX / 3)),
                };
                let result = store
                    .save(&keys[key], &record_with("v", &[value]), TTL, version)
                    .await;
                match (&m.live, stale, result) {
                    (Some(_), false, Ok(new)) => {
                        if m.history.contains(&new) {
                            return Err(fail(at("save reused an old version")));
                        }
                        m.live = Some((value, new));
                        m.history.push(new);
                    }
                    (Some(_), true, Err(StoreError::Conflict)) => {}
                    (None, _, Err(StoreError::NotFound)) => {}
                    (expected, _, got) => {
                        return Err(fail(at(&format!("model {expected:?}, store {got:?}"))));
                    }
                }
            }
            Op::Touch { key } => {
                let touched = store
                    .touch(&keys[key], TTL)
                    .await
                    .map_err(|e| fail(at(&e.to_string())))?;
                if touched != model[key].live.is_some() {
                    return Err(fail(at(&format!("touch said {touched}"))));
                }
            }
            Op::Delete { key } => {
                store
                    .delete(&keys[key])
                    .await
                    .map_err(|e| fail(at(&e.to_string())))?;
                model[key].live = None;
            }
        }
    }
    for key in &keys {
        store.delete(key).await.map_err(|e| fail(e.to_string()))?;
    }
    Ok(())
}

/// Runs `cases` random sequences of up to 40 operations against `store` and the model,
/// shrinking any failure to a minimal sequence. Needs a multi-threaded tokio runtime.
pub async fn check_against_model<S: SessionStore>(store: S, cases: u32) {
    let handle = tokio::runtime::Handle::current();
    tokio::task::block_in_place(|| {
        let config = Config {
            cases,
            failure_persistence: None,
            ..Config::default()
        };
        let mut runner = TestRunner::new(config);
        let result = runner.run(&proptest::collection::vec(op(), 1..40), |ops| {
            handle.block_on(run_sequence(&store, &ops))
        });
        if let Err(error) = result {
            panic!("store disagrees with the model: {error}");
        }
    });
}
