// orderbackend: the order service of the incident (see the module docs of
// observer_testkit::incident). Known users get their order; for unknown users it has the bug of
// the outage, in one of the ways chosen by the user name's last `-` part, so that a test can
// say exactly how many of each it asked for. The first three take the connection over
// (net/http's Hijacker) and write raw bytes; the others fail the way a net/http handler does,
// by panicking with http.ErrAbortHandler (net/http then closes the connection, logging nothing).
//
//   - `cut` (the default): a bodiless status line, `HTTP/1.1 404 Not Found`, then the connection
//     is cut with an RST (SO_LINGER 0): nginx logs `recv() failed (104: Connection reset by
//     peer) while reading response header from upstream` after 24 bytes.
//   - `silent`: the connection is closed without an answer (FIN): nginx logs `upstream
//     prematurely closed connection while reading response header from upstream`.
//   - `abort`: aborted without an answer (RST): the same 104 as `cut`, after 0 bytes.
//   - `panic`: WriteHeader(404), then the handler panics: net/http never wrote the header, no
//     byte is sent and the connection is closed (FIN): nginx logs the same as for `silent`.
//   - `truncated`: `Content-Length: 100`, 8 bytes of body, flushed, then the panic (FIN): nginx
//     logs `upstream prematurely closed connection while reading upstream` after passing the
//     status and the 8 bytes on; the client's read of the body ends in `unexpected EOF`.
//   - `chunked`: a chunked answer (no Content-Length; nginx must speak HTTP/1.1 to the backend,
//     or net/http cannot chunk), one chunk flushed, then the panic: no last chunk (FIN). nginx
//     logs the same as for `truncated`.
//
// -idle-timeout sets http.Server's IdleTimeout: how long a kept-alive connection may wait for
// its next request before the server closes it (0: net/http's default, never).
//
// Standard library only, so `go build` needs no module download.
package main

import (
	"flag"
	"fmt"
	"net"
	"net/http"
	"os"
	"strings"
)

var known = map[string]bool{"alice": true, "bob": true, "carol": true, "dave": true, "erin": true}

// statusLine is all the `cut` answer has: no headers, no body.
const statusLine = "HTTP/1.1 404 Not Found\r\n"

// truncatedBody is what a `truncated` answer sends of the 100 bytes it declares, and the one
// chunk of a `chunked` answer.
const truncatedBody = "{\"user\":"

func main() {
	listen := flag.String("listen", "127.0.0.1:8080", "address to serve on")
	idle := flag.Duration("idle-timeout", 0, "http.Server.IdleTimeout (0: never close an idle connection)")
	flag.Parse()
	ln, err := net.Listen("tcp", *listen)
	if err != nil {
		fmt.Fprintf(os.Stderr, "orderbackend: %v\n", err)
		os.Exit(1)
	}
	// The harness waits for this line: the port is listening once it is printed.
	fmt.Println("ready")
	mux := http.NewServeMux()
	mux.HandleFunc("/order", order)
	server := &http.Server{Handler: mux, IdleTimeout: *idle}
	fmt.Fprintf(os.Stderr, "orderbackend: %v\n", server.Serve(ln))
	os.Exit(1)
}

func order(w http.ResponseWriter, r *http.Request) {
	user := r.URL.Query().Get("user")
	if known[user] {
		w.Header().Set("Content-Type", "application/json")
		fmt.Fprintf(w, "{\"user\":%q,\"order\":\"accepted\"}\n", user)
		return
	}
	switch user[strings.LastIndex(user, "-")+1:] {
	case "panic":
		w.WriteHeader(http.StatusNotFound)
		panic(http.ErrAbortHandler)
	case "truncated":
		w.Header().Set("Content-Type", "application/json")
		w.Header().Set("Content-Length", "100")
		w.Write([]byte(truncatedBody))
		w.(http.Flusher).Flush()
		panic(http.ErrAbortHandler)
	case "chunked":
		w.Header().Set("Content-Type", "application/json")
		w.Write([]byte(truncatedBody))
		w.(http.Flusher).Flush()
		panic(http.ErrAbortHandler)
	}
	conn, _, err := w.(http.Hijacker).Hijack()
	if err != nil {
		http.Error(w, err.Error(), http.StatusInternalServerError)
		return
	}
	tcp, ok := conn.(*net.TCPConn)
	if !ok {
		conn.Close()
		return
	}
	switch user[strings.LastIndex(user, "-")+1:] {
	case "silent":
		tcp.Close()
	case "abort":
		tcp.SetLinger(0)
		tcp.Close()
	default:
		tcp.Write([]byte(statusLine))
		tcp.SetLinger(0)
		tcp.Close()
	}
}
