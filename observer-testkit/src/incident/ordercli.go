// ordercli: the client of the incident (see the module docs of observer_testkit::incident).
// It places one order per user through nginx and retries every error (a transport error, a
// body cut short or a 5xx answer) three times, each attempt on a new connection, as the clients
// of the outage did. After each round it prints one JSON line on stdout: what it saw, attempt
// by attempt.
//
// -method POST places the orders with POST (a small JSON body), which nginx never retries on
// another upstream connection; -gap spaces the orders of a round (each order starts that long,
// plus or minus a random part of -jitter, after the previous one ended), to meet a backend's
// idle timeout.
//
// Standard library only, so `go build` needs no module download.
package main

import (
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"math/rand"
	"net/http"
	"net/url"
	"os"
	"strconv"
	"strings"
	"time"
)

type round struct {
	Orders   int `json:"orders"`
	Failed   int `json:"failed"`
	Attempts int `json:"attempts"`
	Retries  int `json:"retries"`
	// Status lines received, by status (also those whose body was then cut short).
	ByStatus map[string]int `json:"by_status"`
	// Go's error strings of attempts that failed with an error: no answer at all (none through
	// nginx), or an answer whose body was cut short.
	Errors map[string]int `json:"errors"`
	// Attempts that failed with io.ErrUnexpectedEOF (errors.Is), while reading the answer or
	// its body, and those that failed with any other error.
	UnexpectedEOF int `json:"unexpected_eof"`
	OtherErrors   int `json:"other_errors"`
}

func main() {
	base := flag.String("url", "http://127.0.0.1:8000", "nginx's address")
	users := flag.String("users", "alice,ghost", "users to place an order for, comma-separated")
	retries := flag.Int("retries", 3, "retries of every failed order")
	every := flag.Duration("every", 0, "place the orders again after this long, until killed (0: once)")
	method := flag.String("method", "GET", "GET, or POST with a JSON body")
	gap := flag.Duration("gap", 0, "the pause before each order of a round but the first")
	jitter := flag.Duration("jitter", 0, "the gap varies by up to this much either way (uniformly)")
	flag.Parse()
	client := &http.Client{
		// A new connection per attempt, and never a proxy from the environment.
		Transport: &http.Transport{DisableKeepAlives: true, Proxy: nil},
		Timeout:   30 * time.Second,
	}
	for {
		r := round{ByStatus: map[string]int{}, Errors: map[string]int{}}
		for i, user := range strings.Split(*users, ",") {
			if i > 0 && *gap > 0 {
				pause := *gap
				if *jitter > 0 {
					pause += time.Duration(rand.Int63n(2*int64(*jitter)+1)) - *jitter
				}
				time.Sleep(pause)
			}
			r.Orders++
			ok := false
			for attempt := 0; attempt <= *retries && !ok; attempt++ {
				if attempt > 0 {
					r.Retries++
				}
				r.Attempts++
				ok = place(client, *method, *base, user, &r)
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

// place makes one attempt, reading the whole answer; true if it succeeded.
func place(client *http.Client, method, base, user string, r *round) bool {
	target := base + "/order?user=" + url.QueryEscape(user)
	var resp *http.Response
	var err error
	if method == "POST" {
		body, _ := json.Marshal(map[string]string{"user": user})
		resp, err = client.Post(target, "application/json", strings.NewReader(string(body)))
	} else {
		resp, err = client.Get(target)
	}
	if err != nil {
		failed(r, err)
		return false
	}
	r.ByStatus[strconv.Itoa(resp.StatusCode)]++
	_, err = io.ReadAll(resp.Body)
	resp.Body.Close()
	if err != nil {
		failed(r, err)
		return false
	}
	return resp.StatusCode < 500
}

func failed(r *round, err error) {
	r.Errors[err.Error()]++
	if errors.Is(err, io.ErrUnexpectedEOF) {
		r.UnexpectedEOF++
	} else {
		r.OtherErrors++
	}
}
