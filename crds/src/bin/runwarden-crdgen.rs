//! Writes `crds/*.yaml` from the Rust types: `runwarden-crdgen [DIR]` (default: the crate dir).

use std::path::PathBuf;

fn main() -> anyhow::Result<()> {
    let dir =
        std::env::args_os().nth(1).map(PathBuf::from).unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")));
    for (name, yaml) in runwarden_crds::generate::render() {
        let path = dir.join(name);
        std::fs::write(&path, yaml).map_err(|e| anyhow::anyhow!("writing {}: {e}", path.display()))?;
        println!("wrote {}", path.display());
    }
    Ok(())
}
