//! Where cold files go: `file://<dir>` (the default, `<data-dir>/objects`) or
//! `s3://<bucket>[/<prefix>]` with endpoint, region and credentials from `[storage.s3]` (or the
//! standard `AWS_*` variables), path-style addressing so S3-compatible servers work.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use futures::future::BoxFuture;
use object_store::aws::AmazonS3Builder;
use object_store::local::LocalFileSystem;
use object_store::path::Path as ObjPath;
use object_store::{ObjectStore, ObjectStoreExt as _};
use serde::{Deserialize, Serialize};

use super::ColdError;

/// S3 connection settings (`[storage.s3]`); empty strings fall back to `AWS_*` variables.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct S3Settings {
    /// `http(s)://host:port` of an S3-compatible server; empty for AWS.
    pub endpoint: String,
    pub region: String,
    pub access_key_id: String,
    pub secret_access_key: String,
    /// Allow plain HTTP (S3-compatible servers on a private network).
    pub allow_http: bool,
}

/// A parsed object store URL.
#[derive(Clone, Debug, PartialEq)]
pub enum ObjectTarget {
    Local(PathBuf),
    S3 { bucket: String, prefix: String, settings: S3Settings },
}

impl ObjectTarget {
    /// Parses `url`; empty means `file://<data_dir>/objects`.
    pub fn parse(url: &str, data_dir: &Path, s3: &S3Settings) -> Result<ObjectTarget, ColdError> {
        let bad = |reason: &str| ColdError::Url { url: url.to_string(), reason: reason.to_string() };
        if url.is_empty() {
            return Ok(ObjectTarget::Local(data_dir.join("objects")));
        }
        if let Some(rest) = url.strip_prefix("file://") {
            if rest.is_empty() {
                return Err(bad("names no directory"));
            }
            let p = PathBuf::from(rest);
            return Ok(ObjectTarget::Local(if p.is_absolute() { p } else { data_dir.join(p) }));
        }
        if let Some(rest) = url.strip_prefix("s3://") {
            let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
            let valid = (3..=63).contains(&bucket.len())
                && bucket.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'.');
            if !valid {
                return Err(bad("the bucket must be 3-63 characters of a-z, 0-9, '-' and '.'"));
            }
            if prefix.contains("//") || prefix.split('/').any(|s| s == "." || s == "..") {
                return Err(bad("the prefix has an empty, '.' or '..' segment"));
            }
            return Ok(ObjectTarget::S3 {
                bucket: bucket.to_string(),
                prefix: prefix.trim_matches('/').to_string(),
                settings: s3.clone(),
            });
        }
        Err(bad("only file:// and s3:// are supported"))
    }

    /// The URL, for logs and the API (no credentials).
    pub fn url(&self) -> String {
        match self {
            ObjectTarget::Local(p) => format!("file://{}", p.display()),
            ObjectTarget::S3 { bucket, prefix, .. } if prefix.is_empty() => format!("s3://{bucket}"),
            ObjectTarget::S3 { bucket, prefix, .. } => format!("s3://{bucket}/{prefix}"),
        }
    }

    /// Builds the client and the key prefix.
    pub fn build(&self) -> Result<(Arc<dyn ObjectStore>, ObjPath), ColdError> {
        match self {
            ObjectTarget::Local(dir) => {
                std::fs::create_dir_all(dir)
                    .map_err(|e| ColdError::Url { url: self.url(), reason: format!("creating the directory: {e}") })?;
                Ok((Arc::new(LocalFileSystem::new_with_prefix(dir)?), ObjPath::default()))
            }
            ObjectTarget::S3 { bucket, prefix, settings } => {
                let mut b = AmazonS3Builder::from_env()
                    .with_bucket_name(bucket)
                    .with_virtual_hosted_style_request(false)
                    .with_allow_http(settings.allow_http);
                let set = |v: &str| !v.is_empty();
                if set(&settings.endpoint) {
                    b = b.with_endpoint(&settings.endpoint);
                }
                if set(&settings.region) {
                    b = b.with_region(&settings.region);
                }
                if set(&settings.access_key_id) {
                    b = b.with_access_key_id(&settings.access_key_id);
                }
                if set(&settings.secret_access_key) {
                    b = b.with_secret_access_key(&settings.secret_access_key);
                }
                Ok((Arc::new(b.build()?), ObjPath::from(prefix.as_str())))
            }
        }
    }
}

/// Reads one Parquet file of a known size through an object store with ranged GETs: the footer
/// first, then only the column chunks of the row groups a read selects.
pub struct ObjectReader {
    pub store: Arc<dyn ObjectStore>,
    pub path: ObjPath,
    pub size: u64,
}

impl parquet::arrow::async_reader::AsyncFileReader for ObjectReader {
    fn get_bytes(&mut self, range: std::ops::Range<u64>) -> BoxFuture<'_, parquet::errors::Result<bytes::Bytes>> {
        Box::pin(async move { self.store.get_range(&self.path, range).await.map_err(external) })
    }

    fn get_byte_ranges(
        &mut self,
        ranges: Vec<std::ops::Range<u64>>,
    ) -> BoxFuture<'_, parquet::errors::Result<Vec<bytes::Bytes>>> {
        Box::pin(async move { self.store.get_ranges(&self.path, &ranges).await.map_err(external) })
    }

    fn get_metadata<'a>(
        &'a mut self,
        _options: Option<&'a parquet::arrow::arrow_reader::ArrowReaderOptions>,
    ) -> BoxFuture<'a, parquet::errors::Result<Arc<parquet::file::metadata::ParquetMetaData>>> {
        Box::pin(async move {
            let size = self.size;
            let meta = parquet::file::metadata::ParquetMetaDataReader::new()
                .with_prefetch_hint(Some(64 * 1024))
                .load_and_finish(self, size)
                .await?;
            Ok(Arc::new(meta))
        })
    }
}

fn external(e: object_store::Error) -> parquet::errors::ParquetError {
    parquet::errors::ParquetError::External(Box::new(e))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_parse_or_say_why_not() {
        let d = Path::new("/data");
        let s3 = S3Settings::default();
        assert_eq!(ObjectTarget::parse("", d, &s3).unwrap(), ObjectTarget::Local("/data/objects".into()));
        assert_eq!(ObjectTarget::parse("file:///x/y", d, &s3).unwrap(), ObjectTarget::Local("/x/y".into()));
        assert_eq!(ObjectTarget::parse("file://rel", d, &s3).unwrap(), ObjectTarget::Local("/data/rel".into()));
        match ObjectTarget::parse("s3://orb-cold/fleet/eu/", d, &s3).unwrap() {
            ObjectTarget::S3 { bucket, prefix, .. } => {
                assert_eq!((bucket.as_str(), prefix.as_str()), ("orb-cold", "fleet/eu"))
            }
            other => panic!("{other:?}"),
        }
        for (url, why) in [
            ("gs://b", "only file:// and s3://"),
            ("s3://B", "bucket"),
            ("s3://ab", "bucket"),
            ("s3://bucket/a//b", "empty"),
            ("s3://bucket/../b", "'..'"),
            ("file://", "no directory"),
        ] {
            let e = ObjectTarget::parse(url, d, &s3).unwrap_err().to_string();
            assert!(e.contains(why), "{url}: {e}");
        }
    }
}
