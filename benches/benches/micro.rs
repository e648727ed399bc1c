//! Criterion micro-benchmarks of the core: ids, signing, verification, storage keys, the record
//! codec, memory store operations and a whole manager request cycle on the memory store.

#![allow(
    missing_docs,
    reason = "criterion's macros generate undocumented items"
)]

use std::hint::black_box;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use criterion::{BenchmarkId, Criterion, criterion_group, criterion_main};
use session_core::codec::{decode_record, encode_record, encode_value};
use session_core::{
    KeyPrefix, KeyRing, Record, SessionConfig, SessionId, SessionManager, SessionStore, SigningKey,
    StorageKey,
};
use session_memory::MemoryStore;

const TTL: Duration = Duration::from_secs(3600);

fn ring() -> KeyRing {
    KeyRing::new([
        SigningKey::new([1u8; 32]).unwrap(),
        SigningKey::new([2u8; 32]).unwrap(),
    ])
    .unwrap()
}

fn record_of(values: usize) -> Record {
    let mut record = Record::new(SystemTime::now());
    for i in 0..values {
        record.set_value(
            format!("key-{i}"),
            encode_value(&format!("value number {i}")).unwrap(),
        );
    }
    record
}

fn identity(c: &mut Criterion) {
    let ring = ring();
    let id = SessionId::generate().unwrap();
    let cookie = ring.sign("session", &id);
    let mut tampered = cookie.clone().into_bytes();
    tampered[30] = if tampered[30] == b'A' { b'B' } else { b'A' };
    let tampered = String::from_utf8(tampered).unwrap();
    let old_key_cookie = KeyRing::single(SigningKey::new([2u8; 32]).unwrap()).sign("session", &id);

    c.bench_function("id/generate", |b| b.iter(|| SessionId::generate().unwrap()));
    c.bench_function("cookie/sign", |b| {
        b.iter(|| ring.sign("session", black_box(&id)))
    });
    c.bench_function("cookie/verify valid", |b| {
        b.iter(|| ring.verify("session", black_box(&cookie)).unwrap())
    });
    c.bench_function("cookie/verify valid, second key", |b| {
        b.iter(|| ring.verify("session", black_box(&old_key_cookie)).unwrap())
    });
    c.bench_function("cookie/verify tampered", |b| {
        b.iter(|| assert!(ring.verify("session", black_box(&tampered)).is_none()))
    });
    c.bench_function("cookie/verify malformed", |b| {
        b.iter(|| assert!(ring.verify("session", black_box("not-a-cookie")).is_none()))
    });
    let prefix = KeyPrefix::default();
    c.bench_function("storage key/derive", |b| {
        b.iter(|| StorageKey::derive(&prefix, black_box(&id)))
    });
}

fn codec(c: &mut Criterion) {
    let mut group = c.benchmark_group("record");
    for values in [1, 10, 100] {
        let record = record_of(values);
        let bytes = encode_record(&record).unwrap();
        group.bench_with_input(BenchmarkId::new("encode", values), &record, |b, record| {
            b.iter(|| encode_record(black_box(record)).unwrap())
        });
        group.bench_with_input(BenchmarkId::new("decode", values), &bytes, |b, bytes| {
            b.iter(|| decode_record(black_box(bytes)).unwrap())
        });
    }
    group.finish();
}

fn memory_store(c: &mut Criterion) {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap();
    let store = MemoryStore::new();
    let record = record_of(3);
    let key = StorageKey::derive(&KeyPrefix::default(), &SessionId::generate().unwrap());
    let mut version = runtime.block_on(store.create(&key, &record, TTL)).unwrap();
    let mut group = c.benchmark_group("memory store");
    group.bench_function("create+delete", |b| {
        let fresh = StorageKey::derive(&KeyPrefix::default(), &SessionId::generate().unwrap());
        b.iter(|| {
            runtime.block_on(async {
                store.create(&fresh, &record, TTL).await.unwrap();
                store.delete(&fresh).await.unwrap();
            })
        })
    });
    group.bench_function("load", |b| {
        b.iter(|| runtime.block_on(store.load(&key)).unwrap().unwrap())
    });
    group.bench_function("save", |b| {
        b.iter(|| {
            version = runtime
                .block_on(store.save(&key, &record, TTL, version))
                .unwrap();
        })
    });
    group.bench_function("touch", |b| {
        b.iter(|| assert!(runtime.block_on(store.touch(&key, TTL)).unwrap()))
    });
    group.finish();
}

fn manager_cycle(c: &mut Criterion) {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .build()
        .unwrap();
    let manager =
        SessionManager::new(Arc::new(MemoryStore::new()), SessionConfig::new(ring())).unwrap();
    let cookie = runtime.block_on(async {
        let mut session = manager.load(None).await.unwrap();
        session.insert("user", "alice").unwrap();
        session.insert("visits", &0u64).unwrap();
        manager.commit(session).await.unwrap().cookie.unwrap().value
    });
    c.bench_function(
        "manager/request cycle (verify, load, change, commit)",
        |b| {
            b.iter(|| {
                runtime.block_on(async {
                    let mut session = manager.load(Some(&cookie)).await.unwrap();
                    let visits: u64 = session.get("visits").unwrap().unwrap_or(0);
                    session.insert("visits", &(visits + 1)).unwrap();
                    manager.commit(session).await.unwrap()
                })
            })
        },
    );
    c.bench_function("manager/request with a tampered cookie", |b| {
        let tampered = cookie.replace('.', "A.");
        b.iter(|| {
            runtime
                .block_on(manager.load(Some(black_box(&tampered))))
                .unwrap()
        })
    });
}

criterion_group!(benches, identity, codec, memory_store, manager_cycle);
criterion_main!(benches);
