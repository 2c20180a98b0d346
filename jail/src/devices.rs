//! The devices policy on cgroup v2: a `BPF_PROG_TYPE_CGROUP_DEVICE` program attached to a cell's
//! cgroup, allowing only the character devices of a v1-style allow-list.
//!
//! cgroup v2 has no `devices.allow` file; the kernel asks the programs attached to a task's cgroup
//! (and its ancestors') whether an open or mknod of a device node may go ahead. The program is
//! written here as raw BPF instructions (a dozen per rule) and loaded with the bpf(2) system
//! call: no compiler, no BPF library. It reads the access request (`struct bpf_cgroup_dev_ctx`:
//! access and type, major, minor) and answers 1 (allow) only for a character device on the list.
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::Path;

/// `BPF_PROG_LOAD`, `BPF_PROG_ATTACH` (bpf(2) commands).
const BPF_PROG_LOAD: libc::c_int = 5;
const BPF_PROG_ATTACH: libc::c_int = 8;
/// `BPF_PROG_TYPE_CGROUP_DEVICE`.
const PROG_TYPE_CGROUP_DEVICE: u32 = 15;
/// `BPF_CGROUP_DEVICE` attach type.
const ATTACH_CGROUP_DEVICE: u32 = 6;
/// `BPF_DEVCG_DEV_CHAR`.
const DEV_CHAR: i32 = 2;

// Instruction classes and codes (linux/bpf_common.h, linux/bpf.h).
const LDX_MEM_W: u8 = 0x61; // BPF_LDX | BPF_MEM | BPF_W
const ALU64_AND_K: u8 = 0x57; // BPF_ALU64 | BPF_AND | BPF_K
const ALU64_MOV_K: u8 = 0xb7; // BPF_ALU64 | BPF_MOV | BPF_K
const JMP_JNE_K: u8 = 0x55; // BPF_JMP | BPF_JNE | BPF_K
const JMP_EXIT: u8 = 0x95; // BPF_JMP | BPF_EXIT

/// One BPF instruction (`struct bpf_insn`).
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Insn {
    code: u8,
    /// dst register in the low nibble, src in the high one.
    regs: u8,
    off: i16,
    imm: i32,
}

fn insn(code: u8, dst: u8, src: u8, off: i16, imm: i32) -> Insn {
    Insn {
        code,
        regs: (src << 4) | (dst & 0xf),
        off,
        imm,
    }
}

/// One allowed character device: a major and a minor, or every minor.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CharDev {
    pub major: u32,
    pub minor: Option<u32>,
}

/// The character devices of a v1 allow-list (`"c MAJOR:MINOR rwm"`, `*` for any minor); block
/// devices and malformed lines are left out (so never allowed).
pub fn parse_allow_list(lines: &[&str]) -> Vec<CharDev> {
    lines
        .iter()
        .filter_map(|l| {
            let mut w = l.split_whitespace();
            if w.next()? != "c" {
                return None;
            }
            let (maj, min) = w.next()?.split_once(':')?;
            Some(CharDev {
                major: maj.parse().ok()?,
                minor: if min == "*" {
                    None
                } else {
                    Some(min.parse().ok()?)
                },
            })
        })
        .collect()
}

/// The program: r2 = type, r3 = major, r4 = minor; a non-character device is denied; each rule
/// compares major (and minor) and returns 1 on a match; the end returns 0.
fn program(allowed: &[CharDev]) -> Vec<Insn> {
    let mut rules = Vec::new();
    for d in allowed {
        let body: i16 = if d.minor.is_some() { 3 } else { 2 };
        // Majors and minors are 32-bit in the context; the immediate is compared sign-extended
        // on a 64-bit register loaded zero-extended, so values past i32::MAX never match.
        rules.push(insn(JMP_JNE_K, 3, 0, body, d.major as i32));
        if let Some(minor) = d.minor {
            rules.push(insn(JMP_JNE_K, 4, 0, 2, minor as i32));
        }
        rules.push(insn(ALU64_MOV_K, 0, 0, 0, 1));
        rules.push(insn(JMP_EXIT, 0, 0, 0, 0));
    }
    let mut p = vec![
        insn(LDX_MEM_W, 2, 1, 0, 0),
        insn(ALU64_AND_K, 2, 0, 0, 0xffff),
        insn(LDX_MEM_W, 3, 1, 4, 0),
        insn(LDX_MEM_W, 4, 1, 8, 0),
        insn(JMP_JNE_K, 2, 0, rules.len() as i16, DEV_CHAR),
    ];
    p.extend(rules);
    p.push(insn(ALU64_MOV_K, 0, 0, 0, 0));
    p.push(insn(JMP_EXIT, 0, 0, 0, 0));
    p
}

/// `union bpf_attr` for BPF_PROG_LOAD, up to `expected_attach_type`.
#[repr(C)]
#[derive(Default)]
struct LoadAttr {
    prog_type: u32,
    insn_cnt: u32,
    insns: u64,
    license: u64,
    log_level: u32,
    log_size: u32,
    log_buf: u64,
    kern_version: u32,
    prog_flags: u32,
    prog_name: [u8; 16],
    prog_ifindex: u32,
    expected_attach_type: u32,
}

/// `union bpf_attr` for BPF_PROG_ATTACH.
#[repr(C)]
#[derive(Default)]
struct AttachAttr {
    target_fd: u32,
    attach_bpf_fd: u32,
    attach_type: u32,
    attach_flags: u32,
    replace_bpf_fd: u32,
}

/// Loads the program for `allowed`; the descriptor keeps it alive until attached.
pub fn load(allowed: &[CharDev]) -> io::Result<OwnedFd> {
    let insns = program(allowed);
    let license = c"GPL";
    let mut log = vec![0u8; 4096];
    let mut name = [0u8; 16];
    name[..10].copy_from_slice(b"hive_cells");
    let attr = LoadAttr {
        prog_type: PROG_TYPE_CGROUP_DEVICE,
        insn_cnt: insns.len() as u32,
        insns: insns.as_ptr() as u64,
        license: license.as_ptr() as u64,
        log_level: 1,
        log_size: log.len() as u32,
        log_buf: log.as_mut_ptr() as u64,
        prog_name: name,
        expected_attach_type: ATTACH_CGROUP_DEVICE,
        ..Default::default()
    };
    // SAFETY: bpf(BPF_PROG_LOAD) reads `attr` and the instruction and license buffers it points
    // to, and writes at most log_size bytes into `log`; all outlive the call.
    let fd = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            BPF_PROG_LOAD,
            &attr as *const LoadAttr,
            std::mem::size_of::<LoadAttr>(),
        )
    };
    if fd < 0 {
        let err = io::Error::last_os_error();
        let verifier = String::from_utf8_lossy(&log)
            .trim_end_matches('\0')
            .trim()
            .to_string();
        return Err(if verifier.is_empty() {
            err
        } else {
            io::Error::new(err.kind(), format!("{err}; verifier: {verifier}"))
        });
    }
    // SAFETY: the kernel just returned this descriptor; nothing else owns it.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

/// Attaches a loaded program to the cgroup v2 directory `cgroup` (the only program of this
/// group: a cell's group has no children that would want their own).
pub fn attach(prog: &OwnedFd, cgroup: &Path) -> io::Result<()> {
    let dir = std::fs::File::open(cgroup)?;
    let attr = AttachAttr {
        target_fd: dir.as_raw_fd() as u32,
        attach_bpf_fd: prog.as_raw_fd() as u32,
        attach_type: ATTACH_CGROUP_DEVICE,
        ..Default::default()
    };
    // SAFETY: bpf(BPF_PROG_ATTACH) reads `attr`, which outlives the call.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            BPF_PROG_ATTACH,
            &attr as *const AttachAttr,
            std::mem::size_of::<AttachAttr>(),
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Loads and attaches the policy for a v1-style `allow` list to `cgroup`.
pub fn enforce(allow: &[&str], cgroup: &Path) -> io::Result<()> {
    let prog = load(&parse_allow_list(allow))?;
    attach(&prog, cgroup)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn allow_list_keeps_char_devices_only() {
        let d = parse_allow_list(&["c 1:3 rwm", "c 136:* rwm", "b 8:0 rwm", "c x:1 rwm", "a"]);
        assert_eq!(
            d,
            vec![
                CharDev {
                    major: 1,
                    minor: Some(3)
                },
                CharDev {
                    major: 136,
                    minor: None
                }
            ]
        );
    }

    #[test]
    fn program_jumps_land_on_rule_starts_and_the_deny_tail() {
        let p = program(&parse_allow_list(&["c 1:3 rwm", "c 136:* rwm"]));
        // 5 header + (4 + 3) rules + 2 tail.
        assert_eq!(p.len(), 14);
        // The type check skips every rule.
        assert_eq!(p[4].off, 7);
        assert_eq!((p[12].code, p[12].imm), (ALU64_MOV_K, 0));
        // First rule: major mismatch skips its 3 remaining instructions to the second rule.
        assert_eq!((p[5].off, p[5].imm), (3, 1));
        assert_eq!((p[9].off, p[9].imm), (2, 136));
    }

    #[test]
    fn the_kernel_verifier_accepts_it() {
        if !nix::unistd::geteuid().is_root() {
            eprintln!("SKIPPED: needs root");
            return;
        }
        load(&parse_allow_list(crate::cgroup::SANDBOX_DEVICES)).expect("load the device program");
    }
}
