//! `-L LOCAL:VM:PORT` forwards: each local connection becomes a TCP stream through the stack.

use super::*;

/// One local connection of a forward: a stream to `target` through the stack.
pub(super) async fn serve_forward(stream: TcpStream, target: SocketAddrV4, stack: StackHandle) {
    if let Some((tx, rx)) = stack.open(target).await {
        stack.splice(stream, tx, rx).await;
    }
}
