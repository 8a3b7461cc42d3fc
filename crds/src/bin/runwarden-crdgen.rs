//! Writes `crds/*.yaml` from the Rust types, and their copies in the Helm chart
//! (`charts/runwarden/templates/crds/`): `runwarden-crdgen [DIR]` (default: the crate dir).

use std::path::PathBuf;

fn main() -> anyhow::Result<()> {
    // Cargo sets CARGO_MANIFEST_DIR for `cargo run`: this checkout, even when the binary was
    // built from another one sharing the target directory.
    let dir = std::env::args_os()
        .nth(1)
        .or_else(|| std::env::var_os("CARGO_MANIFEST_DIR"))
        .map_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")), PathBuf::from);
    for (name, yaml) in runwarden_crds::generate::render() {
        let path = dir.join(name);
        std::fs::write(&path, yaml).map_err(|e| anyhow::anyhow!("writing {}: {e}", path.display()))?;
        println!("wrote {}", path.display());
    }
    let chart = dir.join("../charts/runwarden/templates/crds");
    std::fs::create_dir_all(&chart).map_err(|e| anyhow::anyhow!("creating {}: {e}", chart.display()))?;
    for (name, yaml) in runwarden_crds::generate::render_chart() {
        let path = chart.join(name);
        std::fs::write(&path, yaml).map_err(|e| anyhow::anyhow!("writing {}: {e}", path.display()))?;
        println!("wrote {}", path.display());
    }
    Ok(())
}
