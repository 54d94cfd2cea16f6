// orderbackend: the order service of the incident (see the module docs of
// observer_testkit::incident). Known users get their order; for unknown users it has the bug of
// the outage, in one of three ways chosen by the user name's last `-` part, so that a test can
// say exactly how many of each it asked for:
//
//   - `cut` (the default): a bodiless status line, `HTTP/1.1 404 Not Found`, then the connection
//     is cut with an RST (SO_LINGER 0): nginx logs `recv() failed (104: Connection reset by
//     peer) while reading response header from upstream` after 24 bytes.
//   - `silent`: the connection is closed without an answer (FIN): nginx logs `upstream
//     prematurely closed connection while reading response header from upstream`.
//   - `abort`: aborted without an answer (RST): the same 104 as `cut`, after 0 bytes.
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

func main() {
	listen := flag.String("listen", "127.0.0.1:8080", "address to serve on")
	flag.Parse()
	ln, err := net.Listen("tcp", *listen)
	if err != nil {
		fmt.Fprintf(os.Stderr, "orderbackend: %v\n", err)
		os.Exit(1)
	}
	// The harness waits for this line: the port is listening once it is printed.
	fmt.Println("ready")
	http.HandleFunc("/order", order)
	fmt.Fprintf(os.Stderr, "orderbackend: %v\n", http.Serve(ln, nil))
	os.Exit(1)
}

func order(w http.ResponseWriter, r *http.Request) {
	user := r.URL.Query().Get("user")
	if known[user] {
		w.Header().Set("Content-Type", "application/json")
		fmt.Fprintf(w, "{\"user\":%q,\"order\":\"accepted\"}\n", user)
		return
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
