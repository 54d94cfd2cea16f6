// ordercli: the client of the incident (see the module docs of observer_testkit::incident).
// It places one order per user through nginx and retries every error (a transport error or a
// 5xx answer) three times, each attempt on a new connection, as the clients of the outage did.
// After each round it prints one JSON line on stdout: what it saw, attempt by attempt.
//
// Standard library only, so `go build` needs no module download.
package main

import (
	"encoding/json"
	"flag"
	"fmt"
	"io"
	"net/http"
	"net/url"
	"os"
	"strconv"
	"strings"
	"time"
)

type round struct {
	Orders   int            `json:"orders"`
	Failed   int            `json:"failed"`
	Attempts int            `json:"attempts"`
	Retries  int            `json:"retries"`
	ByStatus map[string]int `json:"by_status"`
	// Go's error strings of attempts that got no answer at all (none through nginx).
	Errors map[string]int `json:"errors"`
}

func main() {
	base := flag.String("url", "http://127.0.0.1:8000", "nginx's address")
	users := flag.String("users", "alice,ghost", "users to place an order for, comma-separated")
	retries := flag.Int("retries", 3, "retries of every failed order")
	every := flag.Duration("every", 0, "place the orders again after this long, until killed (0: once)")
	flag.Parse()
	client := &http.Client{
		// A new connection per attempt, and never a proxy from the environment.
		Transport: &http.Transport{DisableKeepAlives: true, Proxy: nil},
		Timeout:   30 * time.Second,
	}
	for {
		r := round{ByStatus: map[string]int{}, Errors: map[string]int{}}
		for _, user := range strings.Split(*users, ",") {
			r.Orders++
			ok := false
			for attempt := 0; attempt <= *retries && !ok; attempt++ {
				if attempt > 0 {
					r.Retries++
				}
				r.Attempts++
				ok = place(client, *base, user, &r)
			}
			if !ok {
				r.Failed++
				fmt.Fprintf(os.Stderr, "ordercli: order for %s failed after %d attempts\n", user, *retries+1)
			}
		}
		line, _ := json.Marshal(r)
		fmt.Println(string(line))
		if *every == 0 {
			return
		}
		time.Sleep(*every)
	}
}

// place makes one attempt; true if it succeeded.
func place(client *http.Client, base, user string, r *round) bool {
	resp, err := client.Get(base + "/order?user=" + url.QueryEscape(user))
	if err != nil {
		r.Errors[err.Error()]++
		return false
	}
	io.Copy(io.Discard, resp.Body)
	resp.Body.Close()
	r.ByStatus[strconv.Itoa(resp.StatusCode)]++
	return resp.StatusCode < 500
}
