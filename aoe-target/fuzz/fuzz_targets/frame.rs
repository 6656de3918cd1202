//! Every wire view over arbitrary bytes: no panic, and accessors stay in bounds.
#![no_main]

use aoe_target::wire::{AtaArg, ConfigArg, Header, MaskArg, ReserveArg};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|frame: &[u8]| {
    let _ = Header::parse(frame);
    if let Ok(a) = AtaArg::parse(frame) {
        let _ = (
            a.lba(),
            a.raw_lba(),
            a.data().len(),
            a.sector_count(),
            a.is_write(),
        );
    }
    if let Ok(c) = ConfigArg::parse(frame) {
        assert!(c.string.len() <= aoe_target::wire::MAX_CONFIG_STRING);
        let mut out = vec![0u8; 32 + c.string.len()];
        assert_eq!(c.write(&mut out).ok(), Some(out.len()));
    }
    if let Ok(m) = MaskArg::parse(frame) {
        let _ = m.directives().count();
    }
    if let Ok(r) = ReserveArg::parse(frame) {
        let _ = r.macs();
    }
});
