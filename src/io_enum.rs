//! `AsyncRead`/`AsyncWrite` for enums whose variants each wrap one stream
//! (TCP or TLS clients, TCP or unix-socket servers, and their halves): every
//! call goes to the variant's stream.

/// `impl AsyncRead for $ty`, delegating to the stream in each `$variant`.
macro_rules! delegate_read {
    ($ty:ty: $($variant:path),+) => {
        impl tokio::io::AsyncRead for $ty {
            fn poll_read(
                self: std::pin::Pin<&mut Self>,
                cx: &mut std::task::Context<'_>,
                buf: &mut tokio::io::ReadBuf<'_>,
            ) -> std::task::Poll<std::io::Result<()>> {
                match self.get_mut() {
                    $($variant(s) => tokio::io::AsyncRead::poll_read(std::pin::Pin::new(s), cx, buf),)+
                }
            }
        }
    };
}

/// `impl AsyncWrite for $ty`, delegating to the stream in each `$variant`.
macro_rules! delegate_write {
    ($ty:ty: $($variant:path),+) => {
        impl tokio::io::AsyncWrite for $ty {
            fn poll_write(
                self: std::pin::Pin<&mut Self>,
                cx: &mut std::task::Context<'_>,
                buf: &[u8],
            ) -> std::task::Poll<std::io::Result<usize>> {
                match self.get_mut() {
                    $($variant(s) => tokio::io::AsyncWrite::poll_write(std::pin::Pin::new(s), cx, buf),)+
                }
            }

            fn poll_flush(
                self: std::pin::Pin<&mut Self>,
                cx: &mut std::task::Context<'_>,
            ) -> std::task::Poll<std::io::Result<()>> {
                match self.get_mut() {
                    $($variant(s) => tokio::io::AsyncWrite::poll_flush(std::pin::Pin::new(s), cx),)+
                }
            }

            fn poll_shutdown(
                self: std::pin::Pin<&mut Self>,
                cx: &mut std::task::Context<'_>,
            ) -> std::task::Poll<std::io::Result<()>> {
                match self.get_mut() {
                    $($variant(s) => tokio::io::AsyncWrite::poll_shutdown(std::pin::Pin::new(s), cx),)+
                }
            }
        }
    };
}
