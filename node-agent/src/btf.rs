//! Just enough of a BTF reader to find where a struct member sits in this kernel: the kernel
//! programs are written in Rust, which cannot emit CO-RE relocations, so the one offset they
//! need (`linux_binprm.filename`, for the executable path) is read from the kernel's own BTF
//! (`/sys/kernel/btf/vmlinux`) and handed to them in their settings.

/// The byte offset of member `member` in struct `name`, from raw BTF (`None` when the BTF is
/// malformed, the struct or member is absent, or the member is a bitfield).
pub fn member_offset(btf: &[u8], name: &str, member: &str) -> Option<u32> {
    let u16_at = |at: usize| Some(u16::from_le_bytes(btf.get(at..at + 2)?.try_into().ok()?));
    let u32_at = |at: usize| Some(u32::from_le_bytes(btf.get(at..at + 4)?.try_into().ok()?));
    if u16_at(0)? != 0xeb9f {
        return None;
    }
    let header_len = u32_at(4)? as usize;
    let (type_off, type_len) = (u32_at(8)? as usize, u32_at(12)? as usize);
    let (str_off, str_len) = (u32_at(16)? as usize, u32_at(20)? as usize);
    let strings = btf.get(header_len + str_off..header_len + str_off + str_len)?;
    let string = |off: u32| {
        let rest = strings.get(off as usize..)?;
        let end = rest.iter().position(|&b| b == 0)?;
        std::str::from_utf8(&rest[..end]).ok()
    };
    let (mut at, end) = (header_len + type_off, header_len + type_off + type_len);
    while at + 12 <= end {
        let (name_off, info) = (u32_at(at)?, u32_at(at + 4)?);
        let (kind, vlen, kind_flag) = ((info >> 24) & 0x1f, (info & 0xffff) as usize, info >> 31 == 1);
        let members = at + 12;
        // Bytes after the 12-byte common part, by kind.
        let extra = match kind {
            1 | 14 | 17 => 4,          // INT, VAR, DECL_TAG
            3 => 12,                   // ARRAY
            4 | 5 => 12 * vlen,        // STRUCT, UNION
            6 | 13 => 8 * vlen,        // ENUM, FUNC_PROTO
            15 | 19 => 12 * vlen,      // DATASEC, ENUM64
            2 | 7..=12 | 16 | 18 => 0, // PTR, FWD, TYPEDEF, VOLATILE, CONST, RESTRICT, FUNC, FLOAT, TYPE_TAG
            _ => return None,
        };
        if kind == 4 && string(name_off) == Some(name) {
            for i in 0..vlen {
                let m = members + 12 * i;
                if string(u32_at(m)?) == Some(member) {
                    let offset = u32_at(m + 8)?;
                    let (bits, bitfield) =
                        if kind_flag { (offset & 0xff_ffff, offset >> 24 != 0) } else { (offset, false) };
                    return (!bitfield && bits.is_multiple_of(8)).then_some(bits / 8);
                }
            }
            return None;
        }
        at = members + extra;
    }
    None
}
