"""An HTTP(S) proxy that routes TensorFlow's GCS client to the local GCS emulator (run as its own process).

TensorFlow's GCS filesystem (tf.io.gfile, and etils.epath, which uses it for gs:// when TensorFlow is installed)
has its endpoints compiled in (https://www.googleapis.com, https://storage.googleapis.com) and no setting to
change them. Its libcurl honours `https_proxy`/`http_proxy` and `CURL_CA_BUNDLE`, so the test points those at
this proxy, which accepts only those two hosts, terminates TLS with the test's self-signed certificate and
forwards the bytes to the emulator's plain-HTTP port. One rewrite: TensorFlow starts resumable uploads with
`Transfer-Encoding: identity`, which GCS ignores but Go's HTTP server (the emulator) answers with 501, so that
header is dropped. It must run in its own process: tf.io.gfile holds the GIL while it waits on the network.
"""

import argparse
import os
import socket
import ssl
import threading
import time

HOSTS = (b"www.googleapis.com", b"storage.googleapis.com")


def forward(source: socket.socket, sink: socket.socket, strip_identity: bool) -> None:
    """Copy bytes until either side closes (headers arrive in one read: TLS records and requests are small)."""
    try:
        while data := source.recv(1 << 16):
            if strip_identity:
                data = data.replace(b"Transfer-Encoding: identity\r\n", b"")
            sink.sendall(data)
    except OSError:
        pass
    finally:
        for s in (source, sink):
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass


def handle(client: socket.socket, upstream_port: int, tls: ssl.SSLContext) -> None:
    """Serve one client connection: a CONNECT tunnel (https) or a plain request in absolute form (http)."""
    head = b""
    while b"\r\n\r\n" not in head:
        chunk = client.recv(4096)
        if not chunk:
            client.close()
            return
        head += chunk
    method, target = head.split(b" ", 2)[:2]
    host = target.split(b"://")[-1].split(b"/")[0].split(b":")[0]
    if host not in HOSTS:
        client.sendall(b"HTTP/1.1 403 Forbidden\r\nContent-Length: 0\r\n\r\n")
        client.close()
        return
    upstream = socket.create_connection(("127.0.0.1", upstream_port))
    if method == b"CONNECT":
        client.sendall(b"HTTP/1.1 200 Connection established\r\n\r\n")
        client = tls.wrap_socket(client, server_side=True)
    else:
        upstream.sendall(head.replace(b"Transfer-Encoding: identity\r\n", b""))
    threading.Thread(target=forward, args=(upstream, client, False), daemon=True).start()
    forward(client, upstream, True)


def _exit_with_parent(parent: int) -> None:
    """Exit once the test process that started us is gone (killed runs must not leave the proxy behind)."""
    while os.getppid() == parent:
        time.sleep(1)
    os._exit(0)


def main() -> None:
    """Listen on a free 127.0.0.1 port, print it, serve until killed."""
    parser = argparse.ArgumentParser()
    parser.add_argument("--upstream_port", type=int, required=True)
    parser.add_argument("--cert", required=True)
    parser.add_argument("--key", required=True)
    args = parser.parse_args()
    tls = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    tls.load_cert_chain(args.cert, args.key)
    server = socket.create_server(("127.0.0.1", 0))
    threading.Thread(target=_exit_with_parent, args=(os.getppid(),), daemon=True).start()
    print(server.getsockname()[1], flush=True)
    while True:
        client, _ = server.accept()
        threading.Thread(target=handle, args=(client, args.upstream_port, tls), daemon=True).start()


if __name__ == "__main__":
    main()
