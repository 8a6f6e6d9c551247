//! Generated protobuf and gRPC code (`proto/orbmanager/v1/orbmanager.proto`). Only `net/grpc`
//! uses these types.
#![allow(clippy::all, clippy::pedantic, missing_docs)]

tonic::include_proto!("orbmanager.v1");

/// The encoded file descriptor set, for server reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] = tonic::include_file_descriptor_set!("orbmanager_descriptor");
