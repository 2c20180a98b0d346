//! Guest-written descriptor tables, avail rings and buffers into block, net, rng and vsock.
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    hive_vmm::virtio::fuzz::descriptor_chain(data);
});
