//! The committed seed corpora of the fuzz targets, `fuzz/seeds/<target>/`, made by the real
//! encoder and signer in the proptest twins. A twin's seed test fails when the committed files
//! differ from what this version makes; `FUZZ_WRITE_SEEDS=1 cargo test -p session-core`
//! writes them again.

use std::collections::BTreeSet;
use std::fs;
use std::path::PathBuf;

/// Checks (or, with `FUZZ_WRITE_SEEDS` set, writes) the seeds of `target`: exactly the files
/// `seeds` names, with exactly these bytes.
pub fn check_or_write(target: &str, seeds: &[(&str, Vec<u8>)]) {
    let fuzz = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../fuzz");
    let dir = fuzz.join("seeds").join(target);
    if std::env::var_os("FUZZ_WRITE_SEEDS").is_some() {
        if dir.exists() {
            fs::remove_dir_all(&dir).unwrap();
        }
        fs::create_dir_all(&dir).unwrap();
        for (name, bytes) in seeds {
            fs::write(dir.join(name), bytes).unwrap();
        }
        return;
    }
    assert!(
        fuzz.join("Cargo.toml").exists(),
        "no fuzz crate at {}",
        fuzz.display()
    );
    let committed: BTreeSet<String> = fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}; run with FUZZ_WRITE_SEEDS=1", dir.display()))
        .map(|entry| entry.unwrap().file_name().into_string().unwrap())
        .collect();
    let made: BTreeSet<String> = seeds.iter().map(|(name, _)| (*name).to_owned()).collect();
    assert_eq!(
        committed, made,
        "{target}'s seed files; run with FUZZ_WRITE_SEEDS=1"
    );
    for (name, bytes) in seeds {
        let on_disk = fs::read(dir.join(name)).unwrap();
        assert!(
            &on_disk == bytes,
            "{target}/{name} is stale; run with FUZZ_WRITE_SEEDS=1"
        );
    }
}
