//! Generates the gRPC code from `proto/` with a vendored protoc, so a build needs no system
//! package; also writes the file descriptor set that server reflection serves.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut config = tonic_prost_build::Config::new();
    config.protoc_executable(protoc_bin_vendored::protoc_bin_path()?);
    let out = std::path::PathBuf::from(std::env::var("OUT_DIR")?);
    tonic_prost_build::configure()
        // The CLI prints messages as JSON with `--json`.
        .type_attribute(".orbmanager.v1", "#[derive(serde::Serialize)]")
        .file_descriptor_set_path(out.join("orbmanager_descriptor.bin"))
        .compile_with_config(config, &["proto/orbmanager/v1/orbmanager.proto"], &["proto"])?;
    println!("cargo:rerun-if-changed=proto");
    Ok(())
}
