//! Raw bytes from the wire: the frame parser, the verifier, the payload parsers and the
//! monitoring report parser must never panic.
#![no_main]

use std::sync::OnceLock;

use fabric::auth::{KeyFile, Keyring, Verifier};
use libfuzzer_sys::fuzz_target;

fn keys() -> &'static Keyring {
    static K: OnceLock<Keyring> = OnceLock::new();
    K.get_or_init(|| {
        Keyring::new(&KeyFile::parse(&format!("epoch 1 {}\n", "11".repeat(32))).unwrap())
    })
}

fuzz_target!(|data: &[u8]| {
    if let Ok(f) = fabric::frame::Frame::parse(data) {
        assert!(f.len() <= data.len());
        let _ = f.header();
    }
    let mut buf = data.to_vec();
    let _ = Verifier::default().open(keys(), &mut buf);
    let _ = fabric::payload::Hello::parse(data);
    let _ = fabric::payload::parse_sacks(data);
    let _ = fabric::control::Message::parse(data);
    let _ = fabric::monitor::Report::parse(data);
});
