"""Send the HTTP shapes that once put card numbers into the gateway's error log (issue 20), each
carrying PAN, over raw sockets: malformed_requests.py HOST:PORT. Prints each answer's status line."""

import socket
import sys

PAN = "4000056655665556"  # a card-network test number; the verify greps the logs for it
BODY = f'{{"pan": "{PAN}"}}'
NAMED = f'{{"name": "Zoë", "pan": "{PAN}"}}'
SHAPES = [
    # a body longer than its Content-Length, with Connection: close
    "POST /v1/tokenize HTTP/1.1\r\nHost: g\r\nContent-Length: 5\r\nConnection: close\r\n\r\n" + BODY,
    # a Content-Length counted in characters, not bytes (a non-ASCII name before the PAN)
    f"POST /v1/tokenize HTTP/1.1\r\nHost: g\r\nContent-Length: {len(NAMED)}\r\n\r\n{NAMED}",
    # a PAN inside a malformed request line
    f"GET /v1/tokenize?pan={PAN} HTTP/1.1 junk\r\nHost: g\r\n\r\n",
    # a NUL in a chunked body
    "POST /v1/tokenize HTTP/1.1\r\nHost: g\r\nTransfer-Encoding: chunked\r\n\r\n"
    f"{len(BODY) + 1:x}\r\n{BODY}\0\r\n0\r\n\r\n",
]

host, port = sys.argv[1].rsplit(":", 1)
for shape in SHAPES:
    # No half-close: aiohttp takes a client's FIN as the end of the connection and answers nothing.
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        sock.sendall(shape.encode("utf-8"))
        answer = b""
        while b"\r\n" not in answer:
            try:
                chunk = sock.recv(65536)
            except TimeoutError:
                break
            if not chunk:
                break
            answer += chunk
    print(answer.split(b"\r\n", 1)[0].decode("ascii", "replace"))
