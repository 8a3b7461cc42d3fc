//! The committed CRD YAML is exactly what the Rust types generate.

/// This checkout's `crds/` (cargo sets the variable at run time; the compiled-in value may name
/// another checkout sharing the target directory).
fn crate_dir() -> std::path::PathBuf {
    std::env::var_os("CARGO_MANIFEST_DIR").unwrap_or_else(|| env!("CARGO_MANIFEST_DIR").into()).into()
}

#[test]
fn committed_crd_yaml_matches_the_types() {
    let dir = crate_dir();
    for (name, generated) in runwarden_crds::generate::render() {
        let path = dir.join(name);
        let committed = std::fs::read_to_string(&path).unwrap_or_default();
        assert!(
            committed == generated,
            "crds/{name} differs from what the types in crds/src generate; run `make generate` and commit the result"
        );
    }
}

#[test]
fn every_generated_file_is_committed_and_nothing_else() {
    let dir = crate_dir();
    let mut committed: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.ends_with(".yaml"))
        .collect();
    committed.sort();
    let mut generated: Vec<String> =
        runwarden_crds::generate::render().into_iter().map(|(n, _)| n.to_string()).collect();
    generated.sort();
    assert_eq!(committed, generated, "crds/*.yaml must be exactly the generated CRDs (stale file?)");
}

#[test]
fn the_charts_crds_are_the_generated_ones() {
    let dir = crate_dir().join("../charts/runwarden/templates/crds");
    for (name, generated) in runwarden_crds::generate::render_chart() {
        let committed = std::fs::read_to_string(dir.join(name)).unwrap_or_default();
        assert!(
            committed == generated,
            "charts/runwarden/templates/crds/{name} differs from what the types generate; run `make generate`"
        );
    }
}
