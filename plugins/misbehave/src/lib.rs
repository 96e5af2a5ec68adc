//! `misbehave`: a transform that fails on purpose, for testing courier's sandbox. Config
//! `mode`: `trap` (panics), `loop` (never returns), `hog` (allocates without bound),
//! `error` (returns an error), `drop` (drops the delivery); anything else passes the request
//! through.

wit_bindgen::generate!({ path: "../../wit", world: "transformer" });

use courier::plugin::host::config_get;

struct Misbehave;

impl Guest for Misbehave {
    fn transform(req: Request) -> Result<TransformOutcome, String> {
        match config_get("mode").as_deref() {
            Some("trap") => panic!("misbehave: trapping on purpose"),
            Some("loop") => {
                let mut n: u64 = 0;
                loop {
                    n = std::hint::black_box(n.wrapping_add(1));
                }
            }
            Some("hog") => {
                let mut chunks: Vec<Vec<u8>> = Vec::new();
                loop {
                    chunks.push(vec![1u8; 1 << 20]);
                    std::hint::black_box(&chunks);
                }
            }
            Some("error") => Err("misbehave: failing on purpose".into()),
            Some("drop") => Ok(TransformOutcome::Drop(
                "misbehave: not for this endpoint".into(),
            )),
            _ => Ok(TransformOutcome::Send(req)),
        }
    }
}

export!(Misbehave);
