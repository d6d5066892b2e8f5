//! `cachemoney-s3-server [--host 127.0.0.1] --port PORT --access-key KEY --secret-key SECRET ROOT`
//!
//! A real S3 endpoint for tests and benchmarks: the s3s-fs crate's implementation of the
//! S3 API over the directory ROOT (one subdirectory per bucket, one file per object;
//! conditional puts and multipart uploads included), with SigV4 authentication.
//!
//! Why not s3s-fs's own binary: it leaves Nagle's algorithm on, so the body of every
//! response waits for the client's delayed ACK, 40 ms per request on loopback. That
//! would hide every transfer figure behind a latency no real object store has.

use std::path::PathBuf;

type Error = Box<dyn std::error::Error + Send + Sync>;

struct Options {
    host: String,
    port: u16,
    access_key: String,
    secret_key: String,
    root: PathBuf,
}

fn parse(mut args: impl Iterator<Item = String>) -> Result<Options, Error> {
    let (mut host, mut port, mut access_key, mut secret_key, mut root) =
        ("127.0.0.1".to_string(), None, None, None, None);
    while let Some(arg) = args.next() {
        let mut value = || args.next().ok_or_else(|| format!("{arg}: a value is missing"));
        match arg.as_str() {
            "--host" => host = value()?,
            "--port" => port = Some(value()?.parse()?),
            "--access-key" => access_key = Some(value()?),
            "--secret-key" => secret_key = Some(value()?),
            _ if arg.starts_with("--") => return Err(format!("{arg}: unknown option").into()),
            _ => root = Some(PathBuf::from(arg)),
        }
    }
    Ok(Options {
        host,
        port: port.ok_or("--port is required")?,
        access_key: access_key.ok_or("--access-key is required")?,
        secret_key: secret_key.ok_or("--secret-key is required")?,
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
    let mut builder = s3s::service::S3ServiceBuilder::new(files);
    builder.set_auth(s3s::auth::SimpleAuth::from_single(
        options.access_key,
        options.secret_key,
    ));
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
