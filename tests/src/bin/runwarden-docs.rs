//! `make generate`: rewrites the generated alerts part of `docs/operations.md` from the chart's
//! alerts (see `runwarden_tests::docs`).

fn main() -> Result<(), String> {
    let doc = runwarden_tests::docs::operations()?;
    let path = runwarden_tests::docs::root().join("docs/operations.md");
    std::fs::write(&path, doc).map_err(|e| format!("{}: {e}", path.display()))?;
    println!("wrote {}", path.display());
    Ok(())
}
