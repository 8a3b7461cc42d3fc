//! Member offsets from BTF: this kernel's own, and malformed input.

use proptest::prelude::*;
use runwarden_agent::btf::member_offset;

#[test]
fn this_kernels_linux_binprm_filename_offset_is_found() {
    let raw = std::fs::read("/sys/kernel/btf/vmlinux").expect("the kernel's BTF (CONFIG_DEBUG_INFO_BTF)");
    let offset = member_offset(&raw, "linux_binprm", "filename").expect("linux_binprm.filename");
    assert!(offset > 0 && offset < 4096 && offset.is_multiple_of(8), "{offset}");
    // Another well-known member, to show it is not a constant.
    let comm = member_offset(&raw, "task_struct", "comm").unwrap();
    assert_ne!(comm, offset);
    assert_eq!(member_offset(&raw, "linux_binprm", "no_such_member"), None);
    assert_eq!(member_offset(&raw, "no_such_struct", "filename"), None);
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 2_000, ..ProptestConfig::default() })]

    #[test]
    fn malformed_btf_is_none_not_a_panic(bytes in prop::collection::vec(any::<u8>(), 0..400), magic in any::<bool>()) {
        let mut raw = bytes;
        if magic && raw.len() >= 2 {
            raw[0] = 0x9f;
            raw[1] = 0xeb;
        }
        let _ = member_offset(&raw, "linux_binprm", "filename");
    }
}
