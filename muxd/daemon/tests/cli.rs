//! Snapshot tests of muxd's command line (STYLE practice 8): the help texts are part of the
//! interface, so a change to them shows up in review.
//! Regenerate the snapshots with `TRYCMD=overwrite cargo test -p muxd --test cli`.

#[test]
fn cli_snapshots() {
    trycmd::TestCases::new().case("tests/cmd/*.toml");
}
