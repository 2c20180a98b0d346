//! CPUID normalization: what KVM supports, made consistent for one vCPU of an N-vCPU guest.
//!
//! The host's topology and a few leaves that would mislead a guest are rewritten so every cell of
//! a size class sees the same shape whatever box it lands on: APIC ids, logical-processor counts,
//! the hypervisor bit, and no MONITOR/MWAIT (the guest must idle with HLT, which blocks in KVM).

use kvm_bindings::{kvm_cpuid_entry2, CpuId};

use super::config::CpuTemplate;

const LEAF_FEATURES: u32 = 0x1;
const LEAF_CACHE_TOPOLOGY: u32 = 0x4;
const LEAF_POWER: u32 = 0x6;
const LEAF_EXT_TOPOLOGY: u32 = 0xb;
const LEAF_EXT_TOPOLOGY_V2: u32 = 0x1f;

const LEAF_STRUCTURED: u32 = 0x7;
const LEAF_XSAVE: u32 = 0xd;

const ECX_MONITOR: u32 = 1 << 3;
const ECX_FMA: u32 = 1 << 12;
const ECX_CX16: u32 = 1 << 13;
const ECX_POPCNT: u32 = 1 << 23;
const ECX_XSAVE: u32 = 1 << 26;
const ECX_OSXSAVE: u32 = 1 << 27;
const ECX_AVX: u32 = 1 << 28;
const ECX_F16C: u32 = 1 << 29;
/// Leaf 7.0 EBX: AVX2 (5) and the AVX-512 family (16, 17, 21, 26-28, 30, 31).
const EBX7_AVX: u32 =
    (1 << 5) | (1 << 16) | (1 << 17) | (1 << 21) | (7 << 26) | (1 << 30) | (1 << 31);
const ECX_TSC_DEADLINE: u32 = 1 << 24;
const ECX_HYPERVISOR: u32 = 1 << 31;
const EDX_HTT: u32 = 1 << 28;

fn normalize_entry(e: &mut kvm_cpuid_entry2, vcpu_id: u8, vcpus: u8) {
    match e.function {
        LEAF_FEATURES => {
            // EBX[31:24] initial APIC id, EBX[23:16] logical processors per package,
            // EBX[15:8] CLFLUSH line size in qwords (8 = 64 bytes).
            e.ebx = (u32::from(vcpu_id) << 24) | (u32::from(vcpus) << 16) | (8 << 8);
            e.ecx |= ECX_HYPERVISOR | ECX_TSC_DEADLINE;
            e.ecx &= !ECX_MONITOR;
            if vcpus > 1 {
                e.edx |= EDX_HTT;
            } else {
                e.edx &= !EDX_HTT;
            }
        }
        LEAF_CACHE_TOPOLOGY => {
            // EAX[31:26] cores per package - 1; EAX[25:14] threads sharing this cache - 1.
            e.eax &= 0x3fff;
            if e.eax & 0x1f != 0 {
                e.eax |= (u32::from(vcpus) - 1) << 26;
            }
        }
        LEAF_POWER => {
            // No turbo/HWP/energy-bias knobs: the guest cannot drive them.
            e.eax = 0;
            e.ecx &= !(1 << 3);
        }
        LEAF_EXT_TOPOLOGY | LEAF_EXT_TOPOLOGY_V2 => {
            // One core per vCPU: level 0 SMT with 1 thread, level 1 core with `vcpus`.
            e.edx = u32::from(vcpu_id);
            match e.index {
                0 => {
                    e.eax = 0;
                    e.ebx = 1;
                    e.ecx = 1 << 8;
                }
                1 => {
                    e.eax = 32 - u32::from(vcpus).saturating_sub(1).leading_zeros();
                    e.ebx = u32::from(vcpus);
                    e.ecx = (2 << 8) | 1;
                }
                _ => {
                    e.eax = 0;
                    e.ebx = 0;
                    e.ecx = e.index;
                }
            }
        }
        _ => {}
    }
}

/// The baseline template: no XSAVE/AVX/AVX-512, POPCNT or CMPXCHG16B, so a kernel uses FXSAVE and
/// plain integer paths. These are what the nested KVM on the development machines cannot
/// emulate after an exit; on real hardware it is a portable lowest common denominator.
fn baseline_entry(e: &mut kvm_cpuid_entry2) {
    match e.function {
        LEAF_FEATURES => {
            e.ecx &=
                !(ECX_XSAVE | ECX_OSXSAVE | ECX_AVX | ECX_FMA | ECX_F16C | ECX_POPCNT | ECX_CX16);
        }
        LEAF_STRUCTURED if e.index == 0 => {
            e.ebx &= !EBX7_AVX;
            e.ecx = 0;
            e.edx = 0;
        }
        LEAF_XSAVE => {
            e.eax = 0;
            e.ebx = 0;
            e.ecx = 0;
            e.edx = 0;
        }
        _ => {}
    }
}

/// Rewrites the supported table for vCPU `vcpu_id` of `vcpus`, applying `template`.
pub fn normalize(cpuid: &mut CpuId, vcpu_id: u8, vcpus: u8, template: CpuTemplate) {
    for e in cpuid.as_mut_slice() {
        normalize_entry(e, vcpu_id, vcpus);
        if template == CpuTemplate::Baseline {
            baseline_entry(e);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(function: u32, index: u32) -> kvm_cpuid_entry2 {
        kvm_cpuid_entry2 {
            function,
            index,
            eax: 0xffff_ffff,
            ebx: 0xffff_ffff,
            ecx: 0xffff_ffff,
            edx: 0xffff_ffff,
            ..Default::default()
        }
    }

    #[test]
    fn leaf1_carries_apic_id_count_and_hypervisor_bit() {
        let mut cpuid =
            CpuId::from_entries(&[entry(1, 0), entry(0xb, 1), entry(6, 0)]).expect("cpuid");
        normalize(&mut cpuid, 3, 4, CpuTemplate::Host);
        let e = cpuid.as_slice();
        assert_eq!(e[0].ebx >> 24, 3);
        assert_eq!((e[0].ebx >> 16) & 0xff, 4);
        assert_ne!(e[0].ecx & ECX_HYPERVISOR, 0);
        assert_eq!(e[0].ecx & ECX_MONITOR, 0);
        assert_ne!(e[0].edx & EDX_HTT, 0);
        assert_eq!(e[1].edx, 3, "x2APIC id");
        assert_eq!(e[1].ebx, 4);
        assert_eq!(e[1].eax, 2, "shift for 4 cores");
        assert_eq!(e[2].eax, 0);
    }

    #[test]
    fn baseline_hides_xsave_avx_popcnt_cx16() {
        let mut cpuid =
            CpuId::from_entries(&[entry(1, 0), entry(7, 0), entry(0xd, 0), entry(0xd, 1)])
                .expect("cpuid");
        normalize(&mut cpuid, 0, 1, CpuTemplate::Baseline);
        let e = cpuid.as_slice();
        for bit in [ECX_XSAVE, ECX_OSXSAVE, ECX_AVX, ECX_POPCNT, ECX_CX16] {
            assert_eq!(e[0].ecx & bit, 0, "bit {bit:#x}");
        }
        assert_ne!(e[0].ecx & ECX_HYPERVISOR, 0);
        assert_eq!(e[1].ebx & EBX7_AVX, 0);
        assert_ne!(e[1].ebx, 0, "non-AVX leaf 7 features kept");
        assert_eq!((e[2].eax, e[3].eax), (0, 0));
        // Host template keeps them.
        let mut host = CpuId::from_entries(&[entry(1, 0)]).expect("cpuid");
        normalize(&mut host, 0, 1, CpuTemplate::Host);
        assert_ne!(host.as_slice()[0].ecx & ECX_XSAVE, 0);
    }

    #[test]
    fn single_vcpu_has_no_htt() {
        let mut cpuid = CpuId::from_entries(&[entry(1, 0)]).expect("cpuid");
        normalize(&mut cpuid, 0, 1, CpuTemplate::Host);
        assert_eq!(cpuid.as_slice()[0].edx & EDX_HTT, 0);
        assert_eq!(cpuid.as_slice()[0].ebx >> 24, 0);
    }
}
