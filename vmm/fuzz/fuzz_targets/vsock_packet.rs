//! Guest bytes from the vsock TX ring into the packet parser.
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    hive_vmm::virtio::fuzz::vsock_packet(data);
});
