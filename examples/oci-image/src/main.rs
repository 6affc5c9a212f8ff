//! `oci-image`: writes the plugin as an OCI image layout, the image Istio's and Higress's
//! `WasmPlugin` pull: one layer (tar + gzip) holding `plugin.wasm`, like `FROM scratch` +
//! `COPY … plugin.wasm` would build, but without a container daemon. The output is
//! byte-for-byte reproducible (fixed timestamps, owners and modes); push it with
//! `skopeo copy oci:<dir>:<tag> docker://<registry>/<name>:<tag>` or `crane push <dir> …`.

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::Parser;
use flate2::{Compression, GzBuilder};
use oci_spec::image::{
    ConfigBuilder, Descriptor, DescriptorBuilder, ImageConfigurationBuilder, ImageIndexBuilder,
    ImageManifestBuilder, MediaType, RootFsBuilder, Sha256Digest,
};
use sha2::{Digest, Sha256};

#[derive(Parser)]
#[command(about = "Write the plugin as an OCI image layout (no container daemon needed)")]
struct Cli {
    /// The compiled plugin.
    #[arg(long)]
    wasm: PathBuf,
    /// The OCI layout directory to write (replaced if it exists).
    #[arg(long)]
    out: PathBuf,
    /// The tag recorded in the layout's index (`org.opencontainers.image.ref.name`).
    #[arg(long, default_value = "latest")]
    tag: String,
}

type Error = Box<dyn std::error::Error>;

fn main() -> ExitCode {
    let cli = Cli::parse();
    match write_layout(&cli.wasm, &cli.out, &cli.tag) {
        Ok(digest) => {
            println!(
                "wrote {} (tag {}, manifest sha256:{digest})",
                cli.out.display(),
                cli.tag
            );
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("oci-image: {e}");
            ExitCode::FAILURE
        }
    }
}

/// Stores `bytes` as a blob; returns its hex SHA-256.
fn blob(out: &Path, bytes: &[u8]) -> Result<String, Error> {
    let digest = format!("{:x}", Sha256::digest(bytes));
    fs::write(out.join("blobs/sha256").join(&digest), bytes)?;
    Ok(digest)
}

fn descriptor(media_type: MediaType, digest: &str, size: usize) -> Result<Descriptor, Error> {
    Ok(DescriptorBuilder::default()
        .media_type(media_type)
        .digest(digest.parse::<Sha256Digest>()?)
        .size(size as u64)
        .build()?)
}

/// The layer: a tar of `plugin.wasm`, gzip-compressed. Returns (compressed, uncompressed tar).
fn layer(wasm: &[u8]) -> Result<(Vec<u8>, Vec<u8>), Error> {
    let mut tar = tar::Builder::new(Vec::new());
    let mut header = tar::Header::new_gnu();
    header.set_size(wasm.len() as u64);
    header.set_mode(0o644);
    header.set_mtime(0);
    header.set_uid(0);
    header.set_gid(0);
    header.set_entry_type(tar::EntryType::Regular);
    header.set_cksum();
    tar.append_data(&mut header, "plugin.wasm", wasm)?;
    let tar = tar.into_inner()?;
    let mut gz = GzBuilder::new()
        .mtime(0)
        .write(Vec::new(), Compression::best());
    gz.write_all(&tar)?;
    Ok((gz.finish()?, tar))
}

fn write_layout(wasm_path: &Path, out: &Path, tag: &str) -> Result<String, Error> {
    let wasm = fs::read(wasm_path).map_err(|e| format!("{}: {e}", wasm_path.display()))?;
    if !wasm.starts_with(b"\0asm") {
        return Err(format!("{} is not a WebAssembly module", wasm_path.display()).into());
    }
    if out.exists() {
        fs::remove_dir_all(out)?;
    }
    fs::create_dir_all(out.join("blobs/sha256"))?;

    let (layer_gz, layer_tar) = layer(&wasm)?;
    let layer_digest = blob(out, &layer_gz)?;
    let diff_id = format!("sha256:{:x}", Sha256::digest(&layer_tar));

    let config = ImageConfigurationBuilder::default()
        .architecture("wasm")
        .os("wasip1")
        .config(ConfigBuilder::default().build()?)
        .rootfs(
            RootFsBuilder::default()
                .typ("layers")
                .diff_ids(vec![diff_id])
                .build()?,
        )
        .build()?;
    let config_json = serde_json::to_vec(&config)?;
    let config_digest = blob(out, &config_json)?;

    let manifest = ImageManifestBuilder::default()
        .schema_version(2u32)
        .media_type(MediaType::ImageManifest)
        .config(descriptor(
            MediaType::ImageConfig,
            &config_digest,
            config_json.len(),
        )?)
        .layers(vec![descriptor(
            MediaType::ImageLayerGzip,
            &layer_digest,
            layer_gz.len(),
        )?])
        .build()?;
    let manifest_json = serde_json::to_vec(&manifest)?;
    let manifest_digest = blob(out, &manifest_json)?;

    let mut manifest_descriptor = descriptor(
        MediaType::ImageManifest,
        &manifest_digest,
        manifest_json.len(),
    )?;
    manifest_descriptor.set_annotations(Some(
        [(
            "org.opencontainers.image.ref.name".to_string(),
            tag.to_string(),
        )]
        .into(),
    ));
    let index = ImageIndexBuilder::default()
        .schema_version(2u32)
        .media_type(MediaType::ImageIndex)
        .manifests(vec![manifest_descriptor])
        .build()?;
    fs::write(out.join("index.json"), serde_json::to_vec(&index)?)?;
    fs::write(out.join("oci-layout"), br#"{"imageLayoutVersion":"1.0.0"}"#)?;
    Ok(manifest_digest)
}
