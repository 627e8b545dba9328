//! `-L LOCAL:VM:PORT` forwards: each local connection becomes a TCP stream through the stack.

use super::*;

pub(super) async fn serve_forward(listener: TcpListener, target: SocketAddrV4, stack: StackHandle) {
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            continue;
        };
        let stack = stack.clone();
        let open = stack.activity.enter();
        tokio::spawn(async move {
            let _open = open;
            if let Some((tx, rx)) = stack.open(target).await {
                stack.splice(stream, tx, rx).await;
            }
        });
    }
}
