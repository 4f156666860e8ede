//! What every eBPF object of this crate needs besides its programs: the panic handler (the
//! verifier never lets a program panic) and the license the kernel checks for GPL helpers.

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
