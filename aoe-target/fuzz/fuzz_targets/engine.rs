//! The target engine fed arbitrary frames (mostly made to look like AoE for our address):
//! no panic, nothing left in flight, and it still answers a Query Config afterwards.
#![no_main]

use aoe_target::wire::{Command, Header, Mac};
use aoe_target::{Engine, ExportSpec, FrameBuf, MemBackend, ThinMap};
use libfuzzer_sys::fuzz_target;

const ME: Mac = Mac([2, 0, 0, 0, 0, 9]);

fuzz_target!(|data: &[u8]| {
    let Some((&mode, mut rest)) = data.split_first() else {
        return;
    };
    let mut engine = Engine::new(ME, if mode & 1 == 0 { 2 } else { 17 });
    let spec = ExportSpec {
        shelf: 7,
        slot: 1,
        sectors: 2048,
        bufcnt: 8,
        config: Vec::new(),
        masks: Vec::new(),
        serial: "fuzz".into(),
        writeback: mode & 2 != 0,
        read_only: mode & 4 != 0,
    };
    let map = (mode & 8 != 0).then(|| ThinMap::new(2048, 4096).expect("map"));
    engine.add_export(spec, map);
    let mut io = MemBackend::default();
    io.hold = mode & 16 != 0;
    // Frames: a length byte, then that many bytes (times 8, to reach jumbo sizes).
    while let Some((&len, tail)) = rest.split_first() {
        let n = (usize::from(len) * 8).min(tail.len());
        let mut frame = tail[..n].to_vec();
        rest = &tail[n..];
        if mode & 32 == 0 && frame.len() >= 20 {
            frame[12] = 0x88;
            frame[13] = 0xa2;
            frame[14] = (frame[14] & 0x0f) | 0x10;
            frame[16] = 0;
            frame[17] = 7;
            frame[18] = 1;
            frame[19] %= 5;
        }
        let mut buf = FrameBuf::frame(engine.frame_capacity());
        buf.fill_from(&frame);
        engine.on_frame(buf);
        io.run(&mut engine);
    }
    while io.held() > 0 {
        io.release(&mut engine, 0);
    }
    assert_eq!(engine.outstanding(), 0);
    io.sent.clear();
    let mut q = vec![0u8; 60];
    Header::request(ME, Mac([2, 0, 0, 0, 0, 1]), 7, 1, Command::Config, 1)
        .write(&mut q)
        .expect("header");
    let mut buf = FrameBuf::frame(engine.frame_capacity());
    buf.fill_from(&q);
    engine.on_frame(buf);
    io.run(&mut engine);
    // A MAC mask set by the input may legitimately exclude our query's source.
    if engine.masks(0).is_empty() {
        assert_eq!(io.sent.len(), 1);
    }
});
