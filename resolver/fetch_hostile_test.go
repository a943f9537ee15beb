package resolver

import (
	"context"
	"crypto/tls"
	"fmt"
	"io"
	"log"
	"net"
	"net/http"
	"net/http/httptest"
	"net/netip"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"go.uber.org/goleak"

	"stsmap/internal/fixture"
)

// Hostile policy hosts (issue 8): whatever a policy host does, a fetch ends
// by its deadline (SPEC 4.6) with a failure of a fixed class, holds no more
// than the size limit in memory (SPEC 4.5), and leaves no goroutine and no
// connection behind.

// hostileDeadline is the ctx deadline of a fetch from a hostile host, and
// hostileSlack what a fetch may take beyond it on a busy machine.
const (
	hostileDeadline = time.Second
	hostileSlack    = 2 * time.Second
)

// connCounter is a listener that tracks the connections it accepted until
// the server side closes them, so that a test can wait for the last one to
// close, and close them all when a server misbehaves more than planned.
type connCounter struct {
	net.Listener

	mu       sync.Mutex
	accepted int
	open     map[*countedConn]struct{}
	changed  chan struct{} // closed and replaced whenever open changes
}

func newConnCounter(t *testing.T) *connCounter {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	return &connCounter{Listener: ln, open: map[*countedConn]struct{}{}, changed: make(chan struct{})}
}

func (l *connCounter) Accept() (net.Conn, error) {
	c, err := l.Listener.Accept()
	if err != nil {
		return nil, err
	}
	cc := &countedConn{Conn: c, l: l}
	l.mu.Lock()
	defer l.mu.Unlock()
	l.accepted++
	l.open[cc] = struct{}{}
	l.notify()
	return cc, nil
}

// notify wakes waitClosed; l.mu is held.
func (l *connCounter) notify() {
	close(l.changed)
	l.changed = make(chan struct{})
}

// waitClosed waits until at least one connection was accepted and the
// server side has closed every one, for at most timeout.
func (l *connCounter) waitClosed(t *testing.T, timeout time.Duration) {
	t.Helper()
	timer := time.NewTimer(timeout)
	defer timer.Stop()
	for {
		l.mu.Lock()
		accepted, open, changed := l.accepted, len(l.open), l.changed
		l.mu.Unlock()
		if accepted > 0 && open == 0 {
			return
		}
		select {
		case <-changed:
		case <-timer.C:
			t.Errorf("server side: %d of %d accepted connections still open %v after the fetch", open, accepted, timeout)
			return
		}
	}
}

// closeAll closes the connections still open, so that no hostile handler
// outlives its test even when the fetch under test failed to hang up.
func (l *connCounter) closeAll() {
	l.mu.Lock()
	conns := make([]*countedConn, 0, len(l.open))
	for c := range l.open {
		conns = append(conns, c)
	}
	l.mu.Unlock()
	for _, c := range conns {
		c.Close()
	}
}

type countedConn struct {
	net.Conn
	l    *connCounter
	once sync.Once
}

func (c *countedConn) Close() error {
	err := c.Conn.Close()
	c.once.Do(func() {
		c.l.mu.Lock()
		defer c.l.mu.Unlock()
		delete(c.l.open, c)
		c.l.notify()
	})
	return err
}

// NetConn returns the TCP connection, as tls.Conn's NetConn does.
func (c *countedConn) NetConn() net.Conn { return c.Conn }

// hostileHost serves on ln as a hostile policy host would, and returns a
// function that stops it and waits for its goroutines.
type hostileHost func(t *testing.T, ln *connCounter) (stop func())

// hostileHTTPS is a TLS server with a valid certificate for testFetchHost
// whose handler misbehaves; configure, if not nil, adjusts its TLS config.
func hostileHTTPS(handler http.HandlerFunc, configure func(*tls.Config)) hostileHost {
	return func(t *testing.T, ln *connCounter) func() {
		srv := &httptest.Server{
			Listener: ln,
			TLS:      &tls.Config{Certificates: []tls.Certificate{testFetchCerts(t).good}},
			Config:   &http.Server{Handler: handler, ErrorLog: log.New(io.Discard, "", 0)},
		}
		if configure != nil {
			configure(srv.TLS)
		}
		srv.StartTLS()
		return func() {
			ln.closeAll()
			srv.Close()
		}
	}
}

// silentHost accepts TCP connections and never sends a byte; it reads what
// the client sends, and drops it, until the client hangs up.
func silentHost(t *testing.T, ln *connCounter) func() {
	var wg sync.WaitGroup
	wg.Go(func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			wg.Go(func() {
				io.Copy(io.Discard, c)
				c.Close()
			})
		}
	})
	return func() {
		ln.Close()
		ln.closeAll()
		wg.Wait()
	}
}

// trickleBody sends a policy one byte per second, over and over, until the
// client hangs up.
func trickleBody(w http.ResponseWriter, r *http.Request) {
	w.Header().Set("Content-Type", "text/plain")
	rc := http.NewResponseController(w)
	tick := time.NewTicker(time.Second)
	defer tick.Stop()
	for i := 0; ; i++ {
		if _, err := io.WriteString(w, testPolicy[i%len(testPolicy):][:1]); err != nil {
			return
		}
		if rc.Flush() != nil {
			return
		}
		select {
		case <-r.Context().Done():
			return
		case <-tick.C:
		}
	}
}

// endlessLines is what an endless body repeats: mx lines, as if the policy
// never ended.
var endlessLines = []byte(strings.Repeat("mx: mx.example.com\n", 1000))

// endlessChunked streams a body without end, chunked.
func endlessChunked(w http.ResponseWriter, r *http.Request) {
	w.Header().Set("Content-Type", "text/plain")
	for {
		if _, err := w.Write(endlessLines); err != nil {
			return
		}
	}
}

// endlessUntilClose streams a body without end and without a length or
// chunked encoding: the body would end when the connection does.
func endlessUntilClose(w http.ResponseWriter, r *http.Request) {
	conn, rw, err := http.NewResponseController(w).Hijack()
	if err != nil {
		panic(err)
	}
	defer conn.Close()
	rw.WriteString("HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nConnection: close\r\n\r\n")
	for {
		if _, err := rw.Write(endlessLines); err != nil {
			return
		}
	}
}

// bigHeaders precedes a valid policy with 1 MiB of response headers.
func bigHeaders(w http.ResponseWriter, r *http.Request) {
	pad := strings.Repeat("a", 1024-len("X-Pad-0000: \r\n"))
	for i := range 1024 {
		w.Header().Set(fmt.Sprintf("X-Pad-%04d", i), pad)
	}
	servePolicy("text/plain", testPolicy)(w, r)
}

// resetMidBody declares a body of 1000 bytes, sends part of it and resets
// the connection (SO_LINGER 0: an RST, not a FIN, and no TLS close_notify).
func resetMidBody(w http.ResponseWriter, r *http.Request) {
	conn, rw, err := http.NewResponseController(w).Hijack()
	if err != nil {
		panic(err)
	}
	rw.WriteString("HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: 1000\r\n\r\n" + testPolicy[:20])
	rw.Flush()
	raw := conn
	for {
		if tcp, ok := raw.(*net.TCPConn); ok {
			tcp.SetLinger(0)
			break
		}
		raw = raw.(interface{ NetConn() net.Conn }).NetConn()
	}
	conn.(*tls.Conn).NetConn().Close()
}

func TestFetchHostile(t *testing.T) {
	var redirects atomic.Int32
	mxBody := fixture.MXPolicyOfSize(MaxPolicySize, func(i int) string { return fmt.Sprintf("m%d.example", i) })

	tests := []struct {
		name string
		host hostileHost
		// wantClass is "" for a policy that parses.
		wantClass string
		wantText  string
		// check, if not nil, checks more after the fetch.
		check func(t *testing.T, p *Policy)
	}{
		// SPEC 4.6: ctx bounds the body read.
		{name: "body trickled one byte per second", host: hostileHTTPS(trickleBody, nil),
			wantClass: "timeout", wantText: "reading body: deadline exceeded"},
		// SPEC 4.5: at most MaxPolicySize+1 bytes are read, then the
		// connection is dropped.
		{name: "endless chunked body", host: hostileHTTPS(endlessChunked, nil),
			wantClass: "too_large", wantText: "body larger than 65536 bytes"},
		{name: "endless body until close", host: hostileHTTPS(endlessUntilClose, nil),
			wantClass: "too_large", wantText: "body larger than 65536 bytes"},
		// The transport reads at most fetchMaxHeaderBytes of headers.
		{name: "1 MiB of response headers", host: hostileHTTPS(bigHeaders, nil),
			wantClass: "too_large", wantText: "response headers larger than 16384 bytes"},
		// SPEC 4.3: the first 3xx ends the fetch; the loop is not
		// followed.
		{name: "redirect loop", host: hostileHTTPS(func(w http.ResponseWriter, r *http.Request) {
			redirects.Add(1)
			http.Redirect(w, r, r.URL.Path, http.StatusFound)
		}, nil),
			wantClass: "redirect", wantText: "redirect refused (status 302)",
			check: func(t *testing.T, _ *Policy) {
				if got := redirects.Load(); got != 1 {
					t.Errorf("requests to the redirect loop: got %d, want 1", got)
				}
			}},
		// SPEC 4.2: TLS 1.2 or newer.
		{name: "TLS 1.0 only", host: hostileHTTPS(servePolicy("text/plain", testPolicy), func(c *tls.Config) {
			c.MinVersion, c.MaxVersion = tls.VersionTLS10, tls.VersionTLS10
		}),
			wantClass: "tls", wantText: "protocol version"},
		{name: "connection reset mid-body", host: hostileHTTPS(resetMidBody, nil),
			wantClass: "other", wantText: "reading body: read tcp"},
		// SPEC 4.5: 64 KiB is within the limit, and parses.
		{name: "64 KiB of mx lines", host: hostileHTTPS(serveSized(mxBody, false), nil),
			check: func(t *testing.T, p *Policy) {
				if got, want := len(p.Lines), strings.Count(mxBody, "\n"); got != want {
					t.Errorf("policy lines: got %d, want %d", got, want)
				}
				if got, want := len(p.MX), strings.Count(mxBody, "mx: "); got != want {
					t.Errorf("mx patterns: got %d, want %d (one per unique mx line)", got, want)
				}
			}},
		// SPEC 4.6: ctx bounds the handshake, which net/http runs on a
		// context of its own (see fetchCtxKey). Whether the error names
		// the step depends on which of the two ends first.
		{name: "TCP without TLS", host: silentHost,
			wantClass: "timeout", wantText: "deadline exceeded"},
	}
	if got := len(mxBody); got != MaxPolicySize {
		t.Fatalf("mx policy of %d bytes, want %d", got, MaxPolicySize)
	}
	pool := testFetchCerts(t).ca.Pool
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			// Not parallel: the leak check sees every goroutine.
			leaks := goleak.IgnoreCurrent()
			ln := newConnCounter(t)
			stop := tc.host(t, ln)
			f := &Fetcher{
				Hosts:   &fakeHosts{addrs: []netip.Addr{testFetchAddr}},
				RootCAs: pool,
				DialContext: func(ctx context.Context, network, _ string) (net.Conn, error) {
					var d net.Dialer
					return d.DialContext(ctx, network, ln.Addr().String())
				},
			}

			ctx, cancel := context.WithTimeout(t.Context(), hostileDeadline)
			start := time.Now()
			p, err := f.Fetch(ctx, testFetchDomain)
			elapsed := time.Since(start)
			cancel()
			t.Logf("fetch ended after %v: %v", elapsed.Round(time.Millisecond), err)
			if limit := hostileDeadline + hostileSlack; elapsed > limit {
				t.Errorf("fetch took %v, want at most %v", elapsed, limit)
			}
			switch {
			case tc.wantClass != "":
				wantFetchError(t, p, err, ErrFetch, tc.wantClass, tc.wantText)
			case err != nil:
				t.Errorf("Fetch: %v", err)
			}
			if tc.check != nil && (p != nil || tc.wantClass != "") {
				tc.check(t, p)
			}

			// The fetch hung up: the server side saw every connection
			// close before the server is stopped.
			ln.waitClosed(t, hostileSlack)
			stop()
			goleak.VerifyNone(t, leaks)
		})
	}
}

// TestFetchHostileBlackholedFirstAddress: the policy host's first address
// swallows the connection attempt. It gets its share of the time left, not
// all of it, and the second address serves the policy; the abandoned
// attempt ends with the fetch (SPEC 4.6).
func TestFetchHostileBlackholedFirstAddress(t *testing.T) {
	leaks := goleak.IgnoreCurrent()
	ft := newFetchTest(t, servePolicy("text/plain", testPolicy), testFetchCerts(t).good, nil)
	blackhole := netip.MustParseAddr("192.0.2.1")
	ft.hosts.addrs = []netip.Addr{blackhole, testFetchAddr}
	ft.fetcher.DialContext = func(ctx context.Context, network, addr string) (net.Conn, error) {
		if addr == net.JoinHostPort(blackhole.String(), "443") {
			<-ctx.Done() // as a dropped SYN does
			return nil, ctx.Err()
		}
		return ft.dial(ctx, network, addr)
	}

	// Two addresses and 4 s: the first gets fetchMinDialAttempt (2 s).
	const deadline = 2 * fetchMinDialAttempt
	ctx, cancel := context.WithTimeout(t.Context(), deadline)
	defer cancel()
	start := time.Now()
	p, err := ft.fetcher.Fetch(ctx, testFetchDomain)
	elapsed := time.Since(start)
	if err != nil {
		t.Fatalf("Fetch after %v: %v", elapsed, err)
	}
	checkPolicy(t, p, policyOf(ModeEnforce, day, "mail.example.com"))
	if elapsed >= deadline {
		t.Errorf("fetch took %v, want less than its deadline %v", elapsed, deadline)
	}
	ft.srv.Close()
	goleak.VerifyNone(t, leaks)
}

// lingeringClose delays closing a client connection, as when the goroutine
// closing it is preempted between the TLS close_notify and the close.
type lingeringClose struct{ net.Conn }

func (c lingeringClose) Close() error {
	time.Sleep(300 * time.Millisecond)
	return c.Conn.Close()
}

// TestFetchHostileBodyEndedAfterDeadline: a host sends the start of a valid
// policy and ends the body only when the client hangs up. The client's
// close_notify reaches it before the client's socket is closed, so the end
// of the body arrives after the deadline: the fetch is a timeout, not a
// policy cut short by its own hang-up (SPEC 4.5, 4.6). The trickled body
// above meets the same race now and then; the lingering close makes it
// certain.
func TestFetchHostileBodyEndedAfterDeadline(t *testing.T) {
	leaks := goleak.IgnoreCurrent()
	ft := newFetchTest(t, http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Content-Type", "text/plain")
		io.WriteString(w, testPolicy)
		http.NewResponseController(w).Flush()
		<-r.Context().Done() // the client hung up; the body ends here
	}), testFetchCerts(t).good, nil)
	ft.fetcher.DialContext = func(ctx context.Context, network, addr string) (net.Conn, error) {
		c, err := ft.dial(ctx, network, addr)
		if err != nil {
			return nil, err
		}
		return lingeringClose{c}, nil
	}

	ctx, cancel := context.WithTimeout(t.Context(), 300*time.Millisecond)
	defer cancel()
	p, err := ft.fetcher.Fetch(ctx, testFetchDomain)
	wantFetchError(t, p, err, ErrFetch, "timeout", "reading body: deadline exceeded")
	ft.srv.Close()
	goleak.VerifyNone(t, leaks)
}

// A fetch whose ctx is cancelled (not timed out) while the body trickles
// in ends at once, not at its deadline: cancellation reaches a read
// blocked on the connection.
func TestFetchCanceledMidBody(t *testing.T) {
	ft := newFetchTest(t, http.HandlerFunc(trickleBody), testFetchCerts(t).good, nil)
	ctx, cancel := context.WithTimeout(t.Context(), time.Minute)
	defer cancel()
	time.AfterFunc(300*time.Millisecond, cancel)
	start := time.Now()
	p, err := ft.fetcher.Fetch(ctx, testFetchDomain)
	wantFetchError(t, p, err, ErrFetch, "other", "canceled")
	// Far below the minute of the deadline; generous for a busy machine.
	if took := time.Since(start); took > 20*time.Second {
		t.Errorf("the cancelled fetch took %v", took)
	}
}
