//! `cachemoney-s3-server [--host 127.0.0.1] --port PORT --access-key KEY --secret-key SECRET
//! [--read-only-key KEY:SECRET] ROOT`
//!
//! A real S3 endpoint for tests and benchmarks: the s3s-fs crate's implementation of the
//! S3 API over the directory ROOT (one subdirectory per bucket, one file per object;
//! conditional puts and multipart uploads included), with SigV4 authentication. A second
//! pair of credentials, `--read-only-key`, may read and list but not write: a shared
//! store whose readers have no write permission, as on a bucket policy.
//!
//! Why not s3s-fs's own binary: it leaves Nagle's algorithm on, so the body of every
//! response waits for the client's delayed ACK, 40 ms per request on loopback; and it
//! reads and sends a download in 4 KiB pieces, a system call, a write and a wake-up
//! each, so that the server, not the link or the client, bounds every transfer figure.
//! This server answers with TCP_NODELAY and streams a download's bytes (the range
//! s3s-fs's own `get_object` answered with, headers and all) in 1 MiB pieces; every S3
//! operation is still s3s-fs's own.

use std::path::PathBuf;
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::{Bytes, BytesMut};
use futures::Stream;
use s3s::dto::*;
use s3s::stream::{ByteStream, RemainingLength};
use s3s::{S3Request, S3Response, S3Result, S3};

type Error = Box<dyn std::error::Error + Send + Sync>;

struct Options {
    host: String,
    port: u16,
    access_key: String,
    secret_key: String,
    read_only: Option<(String, String)>,
    root: PathBuf,
}

fn parse(mut args: impl Iterator<Item = String>) -> Result<Options, Error> {
    let (mut host, mut port, mut access_key, mut secret_key, mut root) =
        ("127.0.0.1".to_string(), None, None, None, None);
    let mut read_only = None;
    while let Some(arg) = args.next() {
        let mut value = || {
            args.next()
                .ok_or_else(|| format!("{arg}: a value is missing"))
        };
        match arg.as_str() {
            "--host" => host = value()?,
            "--port" => port = Some(value()?.parse()?),
            "--access-key" => access_key = Some(value()?),
            "--secret-key" => secret_key = Some(value()?),
            "--read-only-key" => {
                let pair = value()?;
                let (key, secret) = pair
                    .split_once(':')
                    .ok_or("--read-only-key takes KEY:SECRET")?;
                read_only = Some((key.to_string(), secret.to_string()));
            }
            _ if arg.starts_with("--") => return Err(format!("{arg}: unknown option").into()),
            _ => root = Some(PathBuf::from(arg)),
        }
    }
    Ok(Options {
        host,
        port: port.ok_or("--port is required")?,
        access_key: access_key.ok_or("--access-key is required")?,
        secret_key: secret_key.ok_or("--secret-key is required")?,
        read_only,
        root: root.ok_or("the data directory (ROOT) is required")?,
    })
}

fn main() {
    let result = parse(std::env::args().skip(1)).and_then(|options| {
        tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .build()?
            .block_on(serve(options))
    });
    if let Err(e) = result {
        eprintln!("cachemoney-s3-server: {e}");
        std::process::exit(2);
    }
}

async fn serve(options: Options) -> Result<(), Error> {
    let files = s3s_fs::FileSystem::new(&options.root)
        .map_err(|e| format!("{}: {e:?}", options.root.display()))?;
    let mut builder = s3s::service::S3ServiceBuilder::new(Regrouped {
        files,
        root: options.root.clone(),
    });
    let mut auth = s3s::auth::SimpleAuth::from_single(options.access_key, options.secret_key);
    if let Some((key, secret)) = &options.read_only {
        auth.register(key.clone(), secret.clone().into());
    }
    builder.set_auth(auth);
    builder.set_access(ReadOnlyKey(options.read_only.map(|(key, _)| key)));
    let service = builder.build();
    let listener = tokio::net::TcpListener::bind((options.host.as_str(), options.port)).await?;
    let http = hyper_util::server::conn::auto::Builder::new(hyper_util::rt::TokioExecutor::new());
    loop {
        let Ok((socket, _)) = listener.accept().await else {
            continue;
        };
        socket.set_nodelay(true)?;
        let connection = http
            .serve_connection(hyper_util::rt::TokioIo::new(socket), service.clone())
            .into_owned();
        tokio::spawn(async move {
            let _ = connection.await;
        });
    }
}

/// Signed requests only; the read-only key's requests only if they read.
struct ReadOnlyKey(Option<String>);

#[async_trait::async_trait]
impl s3s::access::S3Access for ReadOnlyKey {
    async fn check(&self, cx: &mut s3s::access::S3AccessContext<'_>) -> S3Result<()> {
        let Some(credentials) = cx.credentials() else {
            return Err(s3s::s3_error!(AccessDenied, "Signature is required"));
        };
        let reads = matches!(
            cx.s3_op().name(),
            "GetObject" | "HeadObject" | "ListObjects" | "ListObjectsV2" | "HeadBucket" | "GetBucketLocation"
        );
        if self.0.as_deref() == Some(credentials.access_key.as_str()) && !reads {
            return Err(s3s::s3_error!(AccessDenied, "this key may only read"));
        }
        Ok(())
    }
}

/// s3s-fs, with downloads regrouped into large pieces. Only the operations an object
/// store client needs are passed on; the rest answer NotImplemented.
struct Regrouped {
    files: s3s_fs::FileSystem,
    root: PathBuf,
}

/// Pieces of a download are at least this large (but for the last).
const PIECE: usize = 1 << 20;

/// The impl: `get_object` regrouped, the operations listed passed on as they are. (A
/// macro around the whole impl, so that `async_trait` sees the expanded methods.)
macro_rules! regrouped_s3 {
    ($($operation:ident: $input:ty => $output:ty;)*) => {
        #[async_trait::async_trait]
        impl S3 for Regrouped {
            async fn get_object(
                &self,
                request: S3Request<GetObjectInput>,
            ) -> S3Result<S3Response<GetObjectOutput>> {
                let (bucket, key) = (request.input.bucket.clone(), request.input.key.clone());
                let mut response = self.files.get_object(request).await?;
                if let Some(body) = response.output.body.take() {
                    let output = &response.output;
                    let start = output.content_range.as_deref().map_or(Some(0), range_start);
                    let length = output.content_length.and_then(|n| u64::try_from(n).ok());
                    let plain_key = !key.starts_with('/') && !key.split('/').any(|p| p == ".." || p == ".");
                    let reread = match (start, length, plain_key) {
                        (Some(start), Some(length), true) => {
                            FileBody::open(&self.root.join(&bucket).join(&key), start, length).await.ok()
                        }
                        _ => None,
                    };
                    response.output.body = Some(match reread {
                        Some(file) => StreamingBlob::new(file),
                        None => StreamingBlob::new(Pieces {
                            inner: body,
                            buffer: BytesMut::new(),
                            done: false,
                        }),
                    });
                }
                Ok(response)
            }

            $(
                async fn $operation(
                    &self,
                    request: S3Request<$input>,
                ) -> S3Result<S3Response<$output>> {
                    self.files.$operation(request).await
                }
            )*
        }
    };
}

regrouped_s3! {
    head_object: HeadObjectInput => HeadObjectOutput;
    put_object: PutObjectInput => PutObjectOutput;
    delete_object: DeleteObjectInput => DeleteObjectOutput;
    copy_object: CopyObjectInput => CopyObjectOutput;
    list_objects: ListObjectsInput => ListObjectsOutput;
    list_objects_v2: ListObjectsV2Input => ListObjectsV2Output;
    create_multipart_upload: CreateMultipartUploadInput => CreateMultipartUploadOutput;
    upload_part: UploadPartInput => UploadPartOutput;
    complete_multipart_upload: CompleteMultipartUploadInput => CompleteMultipartUploadOutput;
    abort_multipart_upload: AbortMultipartUploadInput => AbortMultipartUploadOutput;
    list_multipart_uploads: ListMultipartUploadsInput => ListMultipartUploadsOutput;
    head_bucket: HeadBucketInput => HeadBucketOutput;
    create_bucket: CreateBucketInput => CreateBucketOutput;
    list_buckets: ListBucketsInput => ListBucketsOutput;
}

/// A download's body, in pieces of at least [`PIECE`] bytes: whatever the file reader
/// has ready is gathered before it is handed to the connection.
struct Pieces {
    inner: StreamingBlob,
    buffer: BytesMut,
    done: bool,
}

impl Stream for Pieces {
    type Item = Result<Bytes, s3s::StdError>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = &mut *self;
        while !this.done && this.buffer.len() < PIECE {
            match Pin::new(&mut this.inner).poll_next(cx) {
                Poll::Ready(Some(Ok(bytes))) => this.buffer.extend_from_slice(&bytes),
                Poll::Ready(Some(Err(e))) => return Poll::Ready(Some(Err(e))),
                Poll::Ready(None) => this.done = true,
                Poll::Pending if this.buffer.is_empty() => return Poll::Pending,
                Poll::Pending => break,
            }
        }
        if this.buffer.is_empty() {
            return Poll::Ready(None);
        }
        Poll::Ready(Some(Ok(this.buffer.split().freeze())))
    }
}

impl ByteStream for Pieces {
    fn remaining_length(&self) -> RemainingLength {
        match self.inner.remaining_length().exact() {
            Some(rest) => RemainingLength::new_exact(rest + self.buffer.len()),
            None => RemainingLength::unknown(),
        }
    }
}

/// `bytes START-END/TOTAL` → START.
fn range_start(content_range: &str) -> Option<u64> {
    content_range
        .strip_prefix("bytes ")?
        .split('-')
        .next()?
        .parse()
        .ok()
}

/// `length` bytes of a file from `start`, read and sent in [`PIECE`]-sized pieces.
struct FileBody {
    reader: tokio_util::io::ReaderStream<tokio::io::Take<tokio::fs::File>>,
    remaining: usize,
}

impl FileBody {
    async fn open(path: &std::path::Path, start: u64, length: u64) -> std::io::Result<FileBody> {
        use tokio::io::{AsyncReadExt, AsyncSeekExt};
        let mut file = tokio::fs::File::open(path).await?;
        file.seek(std::io::SeekFrom::Start(start)).await?;
        Ok(FileBody {
            reader: tokio_util::io::ReaderStream::with_capacity(file.take(length), PIECE),
            remaining: usize::try_from(length).map_err(std::io::Error::other)?,
        })
    }
}

impl Stream for FileBody {
    type Item = Result<Bytes, s3s::StdError>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        match Pin::new(&mut self.reader).poll_next(cx) {
            Poll::Ready(Some(Ok(bytes))) => {
                self.remaining = self.remaining.saturating_sub(bytes.len());
                Poll::Ready(Some(Ok(bytes)))
            }
            Poll::Ready(Some(Err(e))) => Poll::Ready(Some(Err(Box::new(e)))),
            Poll::Ready(None) => Poll::Ready(None),
            Poll::Pending => Poll::Pending,
        }
    }
}

impl ByteStream for FileBody {
    fn remaining_length(&self) -> RemainingLength {
        RemainingLength::new_exact(self.remaining)
    }
}
