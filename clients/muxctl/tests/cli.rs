//! Snapshot tests of muxctl's command line (help text, errors without a daemon).
//! Regenerate the snapshots with `TRYCMD=overwrite cargo test -p muxctl --test cli`.

#[test]
fn cli_snapshots() {
    trycmd::TestCases::new().case("tests/cmd/*.toml");
}
