//! Writes a small OCI layout of sample images for the demo: three images of a made-up
//! site application that share a base layer, as a release would.
//!
//! Usage: `sample-images DIR` (prints the `oci:DIR:REF` source of each image).

#[path = "../tests/common/fixture.rs"]
mod fixture;

use fixture::{ImageSpec, LayerSpec};

fn main() -> std::io::Result<()> {
    let dir = std::env::args_os()
        .nth(1)
        .expect("usage: sample-images DIR");
    let base = LayerSpec {
        seed: 7,
        size: 8 << 20,
    };
    let images: Vec<ImageSpec> = [
        ("edge.example.com/plant/gateway:1.4", 3 << 20),
        ("edge.example.com/plant/historian:2.0", 5 << 20),
        ("edge.example.com/plant/hmi:0.9", 2 << 20),
    ]
    .iter()
    .enumerate()
    .map(|(i, (r, size))| ImageSpec {
        reference: r.to_string(),
        layers: vec![
            base,
            LayerSpec {
                seed: 70 + i as u64,
                size: *size,
            },
        ],
    })
    .collect();
    let layout = fixture::write_oci_layout(std::path::Path::new(&dir), &images)?;
    for i in &layout.images {
        println!("{}", layout.transport_ref(&i.reference));
    }
    Ok(())
}
