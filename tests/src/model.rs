//! The model-based property test: random operation sequences against a reference model.

use std::time::Duration;

use proptest::prelude::*;
use proptest::test_runner::{Config, TestCaseError, TestRunner};
use session_core::{SessionStore, StorageKey, StoreError, StoredEntry, Version};

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
    /// `mark_moved` pointing at key number `to`, with the current version or an older one.
    MarkMoved {
        /// Which key.
        key: usize,
        /// Which key it moves to.
        to: usize,
        /// Use a version from before the latest write.
        stale: bool,
    },
    /// `delete_if_version` with the current version or an older one.
    DeleteIfVersion {
        /// Which key.
        key: usize,
        /// Use a version from before the latest write.
        stale: bool,
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
        key.clone().prop_map(|key| Op::Delete { key }),
        (key.clone(), key.clone(), any::<bool>()).prop_map(|(key, to, stale)| Op::MarkMoved {
            key,
            to,
            stale
        }),
        (key, any::<bool>()).prop_map(|(key, stale)| Op::DeleteIfVersion { key, stale }),
    ]
}

/// What a key holds, as the model sees it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
enum Held {
    /// Nothing.
    #[default]
    Nothing,
    /// A session with this value and version.
    Session(u8, Version),
    /// A moved marker pointing at key number `.0`.
    Moved(usize),
}

/// What the model knows of one key.
#[derive(Default)]
struct KeyModel {
    held: Held,
    /// Every version the store has returned for this key, oldest first.
    history: Vec<Version>,
}

impl KeyModel {
    /// The version a conditional write uses: the current one, an older one when `stale` (or
    /// `None` when there is none to take), and for a missing entry or a marker the last one
    /// handed out (or one never handed out).
    fn version_for(&self, stale: bool) -> Option<Version> {
        match (self.held, stale) {
            (Held::Session(_, current), false) => Some(current),
            (Held::Session(_, current), true) => {
                self.history.iter().rev().find(|v| **v != current).copied()
            }
            _ => Some(
                self.history
                    .last()
                    .copied()
                    .unwrap_or(Version::new(u64::MAX / 3)),
            ),
        }
    }

    /// What a conditional write with a version from [`version_for`](Self::version_for) must
    /// answer: `Ok(())` when it applies.
    fn expected_condition(&self, stale: bool) -> Result<(), &'static str> {
        match (self.held, stale) {
            (Held::Session(..), false) => Ok(()),
            (Held::Session(..), true) | (Held::Moved(_), _) => Err("Conflict"),
            (Held::Nothing, _) => Err("NotFound"),
        }
    }
}

fn error_name(error: &StoreError) -> &'static str {
    match error {
        StoreError::Conflict => "Conflict",
        StoreError::NotFound => "NotFound",
        _ => "other",
    }
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
                match (m.held, result) {
                    (Held::Nothing, Ok(version)) => {
                        if m.history.contains(&version) {
                            return Err(fail(at("create reused an old version")));
                        }
                        m.held = Held::Session(value, version);
                        m.history.push(version);
                    }
                    (Held::Session(..) | Held::Moved(_), Err(StoreError::AlreadyExists)) => {}
                    (expected, got) => {
                        return Err(fail(at(&format!("model {expected:?}, store {got:?}"))));
                    }
                }
            }
            Op::Load { key } => {
                let loaded = store
                    .load_entry(&keys[key])
                    .await
                    .map_err(|e| fail(at(&e.to_string())))?;
                let ok = match (model[key].held, &loaded) {
                    (Held::Nothing, None) => true,
                    (Held::Session(value, version), Some(StoredEntry::Session(got))) => {
                        got.record == record_with("v", &[value]) && got.version == version
                    }
                    (Held::Moved(to), Some(StoredEntry::Moved { to: got })) => *got == keys[to],
                    _ => false,
                };
                if !ok {
                    let expected = model[key].held;
                    return Err(fail(at(&format!("model {expected:?}, store {loaded:?}"))));
                }
                let session = store
                    .load(&keys[key])
                    .await
                    .map_err(|e| fail(at(&e.to_string())))?;
                if session.is_some() != matches!(model[key].held, Held::Session(..)) {
                    return Err(fail(at("load and load_entry disagree")));
                }
            }
            Op::Save { key, value, stale } => {
                let m = &mut model[key];
                let Some(version) = m.version_for(stale) else {
                    continue;
                };
                let result = store
                    .save(&keys[key], &record_with("v", &[value]), TTL, version)
                    .await;
                match (m.expected_condition(stale), result) {
                    (Ok(()), Ok(new)) => {
                        if m.history.contains(&new) {
                            return Err(fail(at("save reused an old version")));
                        }
                        m.held = Held::Session(value, new);
                        m.history.push(new);
                    }
                    (Err(expected), Err(got)) if expected == error_name(&got) => {}
                    (expected, got) => {
                        return Err(fail(at(&format!("model {expected:?}, store {got:?}"))));
                    }
                }
            }
            Op::MarkMoved { key, to, stale } => {
                let m = &mut model[key];
                let Some(version) = m.version_for(stale) else {
                    continue;
                };
                let result = store.mark_moved(&keys[key], version, &keys[to], TTL).await;
                match (m.expected_condition(stale), result) {
                    (Ok(()), Ok(())) => m.held = Held::Moved(to),
                    (Err(expected), Err(got)) if expected == error_name(&got) => {}
                    (expected, got) => {
                        return Err(fail(at(&format!("model {expected:?}, store {got:?}"))));
                    }
                }
            }
            Op::DeleteIfVersion { key, stale } => {
                let m = &mut model[key];
                let Some(version) = m.version_for(stale) else {
                    continue;
                };
                let result = store.delete_if_version(&keys[key], version).await;
                match (m.expected_condition(stale), result) {
                    (Ok(()), Ok(())) => m.held = Held::Nothing,
                    (Err(expected), Err(got)) if expected == error_name(&got) => {}
                    (expected, got) => {
                        return Err(fail(at(&format!("model {expected:?}, store {got:?}"))));
                    }
                }
            }
            Op::Touch { key } => {
                let touched = store
                    .touch(&keys[key], TTL)
                    .await
                    .map_err(|e| fail(at(&e.to_string())))?;
                if touched != matches!(model[key].held, Held::Session(..)) {
                    return Err(fail(at(&format!("touch said {touched}"))));
                }
            }
            Op::Delete { key } => {
                store
                    .delete(&keys[key])
                    .await
                    .map_err(|e| fail(at(&e.to_string())))?;
                model[key].held = Held::Nothing;
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
