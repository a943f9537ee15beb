package socketmap

// Hostile or broken clients (issue 8, item 4), over real loopback sockets.
// server_test.go has the basics, one client at a time: TestServeIdleTimeout
// (a silent or half-open client), TestServeMaxConns (a connection held at the
// limit), TestServeReplies and TestServeMalformedClosesOnlyThatConnection
// (framing errors). The tests here add numbers and pressure: thousands of
// connections, clients that never finish a request or never read a reply,
// declared lengths meant to make the server allocate, and pipelined floods.

import (
	"bufio"
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"runtime"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"go.uber.org/goleak"

	"stsmap/internal/fixture"
)

// floodConns is how many connections TestHostileConnectionFlood opens:
// more than MaxConns (1000) and the kernel's listen queue (somaxconn, 4096
// by default) together, so that some are refused.
var floodConns = 10000

// pipelined scales the pipelined floods down under the race detector,
// where each request costs several times more.
var pipelined = 1

func init() {
	if fixture.RaceEnabled() {
		floodConns, pipelined = 6000, 5
	}
}

// connGauge counts a Server's connections through its ConnState hook and
// remembers the most served at once.
type connGauge struct {
	open, peak, ended atomic.Int64
}

func (g *connGauge) state(delta int) {
	n := g.open.Add(int64(delta))
	if delta < 0 {
		g.ended.Add(1)
		return
	}
	raise(&g.peak, n)
}

func raise(v *atomic.Int64, n int64) {
	for p := v.Load(); n > p && !v.CompareAndSwap(p, n); p = v.Load() {
	}
}

// stopServer shuts ts down and checks that no goroutine started since
// ignore was taken is left, client or server.
func stopServer(t *testing.T, ts *testServer, ignore goleak.Option) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	if err := ts.Shutdown(ctx); err != nil {
		t.Errorf("Shutdown: %v", err)
	}
	ts.wait(t)
	goleak.VerifyNone(t, ignore)
}

// An asker is a client established before some trouble starts that keeps
// asking, every few milliseconds, so that it is seen to be served all
// through the trouble (and never idles out).
type asker struct {
	answers atomic.Int64
	done    chan struct{}
	result  chan error
}

func keepAsking(c net.Conn) *asker {
	a := &asker{done: make(chan struct{}), result: make(chan error, 1)}
	req, want := []byte(ns("policy found")), ns("OK secure match=.example.net")
	go func() {
		tick := time.NewTicker(10 * time.Millisecond)
		defer tick.Stop()
		got := make([]byte, len(want))
		for {
			select {
			case <-a.done:
				a.result <- nil
				return
			case <-tick.C:
			}
			// The answer must come promptly, whatever the others do (on
			// a machine that may be busy with other work).
			c.SetDeadline(time.Now().Add(10 * time.Second))
			if _, err := c.Write(req); err != nil {
				a.result <- err
				return
			}
			if _, err := io.ReadFull(c, got); err != nil {
				a.result <- err
				return
			}
			if string(got) != want {
				a.result <- fmt.Errorf("got %q, want %q", got, want)
				return
			}
			a.answers.Add(1)
		}
	}()
	return a
}

// stop ends the asking and returns how many answers came; it fails the
// test if one was wrong or late.
func (a *asker) stop(t *testing.T) int64 {
	t.Helper()
	close(a.done)
	if err := <-a.result; err != nil {
		t.Fatalf("established client after %d answers: %v", a.answers.Load(), err)
	}
	return a.answers.Load()
}

func splitAddr(addr string) (network, address string) {
	if path, ok := strings.CutPrefix(addr, "unix:"); ok {
		return "unix", path
	}
	return "tcp", addr
}

// Ten thousand connections at once. MaxConns holds: the server stops
// accepting at the limit and the connections over it wait in the kernel's
// listen queue, costing the server no goroutine and no descriptor; once
// that queue is full the kernel refuses the rest (EAGAIN on a unix socket,
// a dropped SYN and so a dial timeout on TCP). A client established before
// the flood is served all through it, and when the flood hangs up, the
// server works through its queue at once.
func TestHostileConnectionFlood(t *testing.T) {
	const (
		maxConns = 1000
		dialers  = 1000
		// A loopback handshake takes microseconds; a TCP dial still
		// waiting after this had its SYN dropped at a full listen queue
		// (or, on this busy machine, was not even tried in time).
		dialTimeout = 200 * time.Millisecond
	)
	// This process holds both ends: the flood's client ends, and the
	// server's MaxConns plus the one it holds at the limit.
	fixture.RaiseFileLimit(t, uint64(floodConns+maxConns+200))
	for _, network := range []string{"tcp", "unix"} {
		t.Run(network, func(t *testing.T) {
			ignore := goleak.IgnoreCurrent()
			var g connGauge
			// The idle timeout is long: here the flood, not the timeout,
			// decides when connections end (see TestHostileIdleClients).
			ts := startServer(t, &Server{MaxConns: maxConns, IdleTimeout: time.Minute, ConnState: g.state})
			addr := ts.addrs[0]
			if network == "unix" {
				addr = ts.addrs[1]
			}
			early := dial(t, addr)
			send(t, early, ns("policy found"))
			expect(t, early, ns("OK secure match=.example.net"))
			goroutinesBefore := runtime.NumGoroutine()
			a := keepAsking(early)

			start := time.Now()
			conns := make([]net.Conn, floodConns)
			var refused, timedOut, failed atomic.Int64
			var slowestRefusal atomic.Int64 // nanoseconds
			var firstErr error
			var errOnce sync.Once
			work := make(chan int)
			var wg sync.WaitGroup
			dialNet, dialAddr := splitAddr(addr)
			for range dialers {
				wg.Go(func() {
					d := net.Dialer{Timeout: dialTimeout}
					var ne net.Error
					for i := range work {
						t0 := time.Now()
						c, err := d.Dial(dialNet, dialAddr)
						switch {
						case err == nil:
							conns[i] = c
						case errors.Is(err, syscall.EAGAIN):
							refused.Add(1)
							raise(&slowestRefusal, int64(time.Since(t0)))
						case errors.As(err, &ne) && ne.Timeout():
							timedOut.Add(1)
						default:
							failed.Add(1)
							errOnce.Do(func() { firstErr = err })
						}
					}
				})
			}
			for i := range floodConns {
				work <- i
			}
			close(work)
			wg.Wait()
			dialed := time.Since(start)
			established := int64(floodConns) - refused.Load() - timedOut.Load() - failed.Load()
			// The server takes the first MaxConns of the queue.
			if !fixture.Poll(10*time.Second, 5*time.Millisecond, func() bool { return g.open.Load() == maxConns }) {
				t.Errorf("%d connections served during the flood, want MaxConns (%d)", g.open.Load(), maxConns)
			}
			goroutinesDuring := runtime.NumGoroutine()
			// The established client is served while the flood holds
			// every slot (its asker may not even have run yet on a busy
			// machine: wait for an answer, with the flood still open).
			fixture.Poll(10*time.Second, 5*time.Millisecond, func() bool { return a.answers.Load() > 0 })
			answersDuringFlood := a.answers.Load()
			t.Logf("%s: %d connections tried in %v: %d established, %d refused with EAGAIN (slowest %v), %d timed out, %d failed; served at once: %d, at most %d (MaxConns %d); goroutines: %d before, %d during",
				network, floodConns, dialed.Round(time.Millisecond), established, refused.Load(),
				time.Duration(slowestRefusal.Load()).Round(time.Microsecond), timedOut.Load(), failed.Load(),
				g.open.Load(), g.peak.Load(), maxConns, goroutinesBefore, goroutinesDuring)
			if failed.Load() > 0 {
				t.Errorf("%d dials failed, first: %v", failed.Load(), firstErr)
			}
			if established < maxConns {
				t.Errorf("only %d flood connections established, want at least MaxConns (%d)", established, maxConns)
			}
			// connect(2) returns EAGAIN without waiting; what a dial takes
			// beyond that is this machine's scheduling.
			if d := time.Duration(slowestRefusal.Load()); d > 5*time.Second {
				t.Errorf("slowest refused dial took %v, want a prompt refusal", d)
			}
			// The connections over the limit cost no goroutine: one per
			// served connection, none for those queued.
			if limit := goroutinesBefore + maxConns + 10; goroutinesDuring > limit {
				t.Errorf("%d goroutines with %d connections open, want at most %d (one per served connection)", goroutinesDuring, established, limit)
			}

			// The flood hangs up: the server ends its connections and works
			// through the queue, whose clients are gone too, each taking a
			// slot for a moment.
			hungUp := time.Now()
			for _, c := range conns {
				if c != nil {
					c.Close()
				}
			}
			if !fixture.Poll(10*time.Second, 5*time.Millisecond, func() bool { return g.ended.Load() >= established && g.open.Load() == 1 }) {
				t.Errorf("10s after the flood hung up: %d of its %d connections ended, %d served; want all ended and 1 served (the established client)",
					g.ended.Load(), established, g.open.Load())
			}
			t.Logf("%s: the server ended all %d flood connections %v after the flood hung up",
				network, g.ended.Load(), time.Since(hungUp).Round(time.Millisecond))

			// The established client was served during the flood, and is
			// served after it.
			fixture.Poll(10*time.Second, 5*time.Millisecond, func() bool { return a.answers.Load() > answersDuringFlood })
			if answers := a.stop(t); answersDuringFlood == 0 || answers == answersDuringFlood {
				t.Errorf("established client answered %d times during the flood and %d in all, want answers all through", answersDuringFlood, answers)
			}
			send(t, early, ns("policy found"))
			expect(t, early, ns("OK secure match=.example.net"))
			if p := g.peak.Load(); p > maxConns {
				t.Errorf("served %d connections at once, want at most MaxConns %d", p, maxConns)
			}
			stopServer(t, ts, ignore)
		})
	}
}

// ConnState never counts more than MaxConns, even for a moment: a
// connection reports its end before it frees its slot for the next one. The
// hook of the ending connection holds for a while, so that a connection
// started early in that while would be counted with it.
func TestHostileConnStateWithinLimit(t *testing.T) {
	ignore := goleak.IgnoreCurrent()
	var g connGauge
	started := make(chan struct{}, 2)
	var first sync.Once
	hook := func(delta int) {
		if delta > 0 {
			g.state(delta)
			started <- struct{}{}
			return
		}
		// Waiting for something that must not happen needs a bound.
		first.Do(func() {
			select {
			case <-started:
			case <-time.After(200 * time.Millisecond):
			}
		})
		g.state(delta)
	}
	ts := startServer(t, &Server{MaxConns: 1, ConnState: hook})
	a := dial(t, ts.addrs[0])
	send(t, a, ns("policy x"))
	expect(t, a, notFound)
	<-started
	b := dial(t, ts.addrs[0]) // held at the limit
	send(t, b, ns("policy x"))
	a.Close()
	expect(t, b, notFound)
	if p := g.peak.Load(); p > 1 {
		t.Errorf("ConnState counted %d connections at once, want at most MaxConns 1", p)
	}
	stopServer(t, ts, ignore)
}

// Clients that never finish a request, or never start one, are closed by
// the idle timeout (a trickle of bytes does not renew it), and until then
// they hold only their own slots.
func TestHostileIdleClients(t *testing.T) {
	const idle = 200 * time.Millisecond
	hostile := []struct {
		name    string
		send    string
		reply   string // the reply owed before the connection goes quiet
		trickle bool   // then send one byte every idle/4, never ending the request
	}{
		{"silent", "", "", false},
		{"in the length", "12", "", false},
		{"after the colon", "12:", "", false},
		{"inside the payload", "12:policy fou", "", false},
		{"before the comma", "12:policy found", "", false},
		{"after a request, half of the next", ns("policy x") + "12:pol", notFound, false},
		{"trickle", "9999:", "", true},
	}
	ignore := goleak.IgnoreCurrent()
	var g connGauge
	// Room for the hostile clients and the established one, and no more.
	ts := startServer(t, &Server{MaxConns: len(hostile) + 1, IdleTimeout: idle, ConnState: g.state})
	early := dial(t, ts.addrs[0])
	send(t, early, ns("policy found"))
	expect(t, early, ns("OK secure match=.example.net"))
	a := keepAsking(early)

	type result struct {
		got     string
		err     error
		elapsed time.Duration // from the last byte of the request part sent
	}
	results := make([]chan result, len(hostile))
	stopTrickle := make(chan struct{})
	var wg sync.WaitGroup
	for i, h := range hostile {
		c := dial(t, ts.addrs[i%2])
		results[i] = make(chan result, 1)
		send(t, c, h.send)
		sent := time.Now()
		if h.trickle {
			wg.Go(func() {
				tick := time.NewTicker(idle / 4)
				defer tick.Stop()
				for {
					select {
					case <-stopTrickle:
						return
					case <-tick.C:
					}
					if _, err := c.Write([]byte("x")); err != nil {
						return // closed by the server
					}
				}
			})
		}
		wg.Go(func() {
			c.SetReadDeadline(time.Now().Add(10 * time.Second))
			reply := make([]byte, len(h.reply))
			if n, err := io.ReadFull(c, reply); err != nil {
				results[i] <- result{string(reply[:n]), err, time.Since(sent)}
				return
			}
			// Time the silence after the reply.
			sent = time.Now()
			rest, err := io.ReadAll(c)
			results[i] <- result{string(reply) + string(rest), err, time.Since(sent)}
		})
	}
	if !fixture.Poll(5*time.Second, 5*time.Millisecond, func() bool { return g.open.Load() == int64(len(hostile)+1) }) {
		t.Fatalf("%d connections served, want %d", g.open.Load(), len(hostile)+1)
	}
	// At the limit, a newcomer waits at most about one idle timeout: the
	// first hostile client to be closed makes room.
	late := dial(t, ts.addrs[0])
	asked := time.Now()
	send(t, late, ns("policy found"))
	expect(t, late, ns("OK secure match=.example.net"))
	if wait := time.Since(asked); wait > idle+3*time.Second {
		t.Errorf("a new client waited %v at the limit, want about the idle timeout (%v)", wait, idle)
	}

	for i, h := range hostile {
		r := <-results[i]
		if (r.err != nil && !errors.Is(r.err, syscall.ECONNRESET)) || r.got != h.reply {
			t.Errorf("%s: read %q, %v; want %q, then the connection closed", h.name, r.got, r.err, h.reply)
		}
		// Not closed as malformed at once, nor left open long after.
		if r.elapsed < idle/2 || r.elapsed > idle+3*time.Second {
			t.Errorf("%s: closed %v after going quiet, want after the idle timeout (%v)", h.name, r.elapsed.Round(time.Millisecond), idle)
		}
	}
	close(stopTrickle)
	wg.Wait()
	if a.stop(t) == 0 {
		t.Errorf("the established client got no answer while the hostile clients were open")
	}
	if got := ts.logs.String(); strings.Contains(got, "malformed") || strings.Count(got, "idle timeout") < len(hostile) {
		t.Errorf("log has %d idle timeouts and %d malformed requests, want at least %d and 0:\n%s",
			strings.Count(got, "idle timeout"), strings.Count(got, "malformed"), len(hostile), got)
	}
	stopServer(t, ts, ignore)
}

// A client that sends many requests and never reads the replies: the write
// deadline ends its connection, and nobody else waits for it.
func TestHostileClientStopsReading(t *testing.T) {
	const (
		writeTimeout = 200 * time.Millisecond
		requests     = 30000 // 30 MB of replies, more than any socket buffers hold
	)
	batch := []byte(strings.Repeat(ns("policy size:1000"), requests))
	for _, network := range []string{"tcp", "unix"} {
		t.Run(network, func(t *testing.T) {
			ignore := goleak.IgnoreCurrent()
			var g connGauge
			ts := startServer(t, &Server{WriteTimeout: writeTimeout, ConnState: g.state})
			addr := ts.addrs[0]
			if network == "unix" {
				addr = ts.addrs[1]
			}
			other := dial(t, ts.addrs[0])
			send(t, other, ns("policy found"))
			expect(t, other, ns("OK secure match=.example.net"))
			a := keepAsking(other)

			c := dial(t, addr)
			wrote := make(chan error, 1)
			start := time.Now()
			go func() {
				// Fails once the server has closed the connection, or
				// completes into the socket buffers; either way it ends.
				c.SetWriteDeadline(time.Now().Add(20 * time.Second))
				_, err := c.Write(batch)
				wrote <- err
			}()
			if !fixture.Poll(10*time.Second, 5*time.Millisecond, func() bool { return g.ended.Load() == 1 }) {
				t.Fatalf("the connection of a client that never reads is still open after %v (write timeout %v)", time.Since(start), writeTimeout)
			}
			closed := time.Since(start)
			select {
			case err := <-wrote:
				t.Logf("%s: closed %v after the client started writing; its write returned %v", network, closed.Round(time.Millisecond), err)
			case <-time.After(20 * time.Second):
				t.Fatal("the client's write never returned")
			}
			if a.stop(t) == 0 {
				t.Errorf("the other client got no answer while one did not read")
			}
			if got := ts.logs.String(); !strings.Contains(got, "write failed") || !strings.Contains(got, "i/o timeout") {
				t.Errorf("log does not report the write timeout:\n%s", got)
			}
			stopServer(t, ts, ignore)
		})
	}
}

// Oversize and malformed netstrings close only their own connection
// (SPEC 1.1), after the replies owed to the requests before them (SPEC 1.2).
// The simple cases are in TestServeReplies.
func TestHostileMalformedRequests(t *testing.T) {
	const found = "OK secure match=.example.net"
	atLimit := ns("policy " + strings.Repeat("x", DefaultMaxRequestSize-len("policy ")))
	tests := []struct {
		name   string
		send   string
		want   string
		closes bool
	}{
		{"huge declared length", "99999999999:", "", true},
		{"huge declared length, then data", "99999999999:" + strings.Repeat("x", 100000), "", true},
		{"at the limit", atLimit, notFound, false},
		{"negative length", "-1:,", "", true},
		{"empty length", ":,", "", true},
		{"empty netstring", "0:,", "", true}, // no map name
		{"plus sign", "+8:policy x,", "", true},
		{"space before length", " 8:policy x,", "", true},
		{"hex length", "0x8:policy x,", "", true},
		{"payload longer than declared", "6:policy x,", "", true},
		{"second comma", ns("policy x") + ",", notFound, true},
		{"two requests, then a leading zero", ns("policy x") + ns("policy found") + "01:", notFound + ns(found), true},
		{"a request, then a huge length", ns("policy found") + "99999999999:", ns(found), true},
	}
	ignore := goleak.IgnoreCurrent()
	ts := startServer(t, &Server{})
	other := dial(t, ts.addrs[0])
	closing := 0
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			c := dial(t, ts.addrs[0])
			// The server may close before reading it all: write errors are
			// expected.
			c.SetWriteDeadline(time.Now().Add(5 * time.Second))
			c.Write([]byte(tt.send))
			expect(t, c, tt.want)
			if tt.closes {
				closing++
				expectClosed(t, c)
			} else {
				send(t, c, ns("policy x"))
				expect(t, c, notFound)
			}
			// Other connections are unaffected.
			send(t, other, ns("policy found"))
			expect(t, other, ns(found))
		})
	}
	logs := ts.logs.String()
	if got := strings.Count(logs, "malformed request"); got != closing {
		t.Errorf("log has %d malformed requests, want %d:\n%s", got, closing, logs)
	}
	if strings.Contains(logs, strings.Repeat("x", maxLogBytes+1)) {
		t.Errorf("log repeats more than %d bytes of a request (SPEC 8.3)", maxLogBytes)
	}
	stopServer(t, ts, ignore)
}

// A declared length costs nothing until the bytes arrive: refused over the
// limit (SPEC 1.1) before any allocation, and under it the buffer grows
// with what is received, so a client cannot make the server reserve
// MaxRequestSize per connection by announcing it.
func TestHostileDeclaredLengthAllocation(t *testing.T) {
	const maxSize = 1 << 20 // config.go's highest socketmap.max_request_size
	tests := []struct {
		name string
		in   string
		max  int
	}{
		{"huge declared length", "99999999999:", DefaultMaxRequestSize},
		{"over the limit", "1048577:", maxSize},
		{"at the limit, nothing sent", "1048576:", maxSize},
		{"at the limit, a little sent", "1048576:policy " + strings.Repeat("x", 100), maxSize},
	}
	const runs, perRun = 100, 16 << 10
	br := bufio.NewReader(nil)
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			var before, after runtime.MemStats
			runtime.ReadMemStats(&before)
			for range runs {
				br.Reset(strings.NewReader(tt.in))
				if _, err := NewDecoder(br, tt.max).Next(); err == nil {
					t.Fatal("Next succeeded, want an error")
				}
			}
			runtime.ReadMemStats(&after)
			if got := (after.TotalAlloc - before.TotalAlloc) / runs; got > perRun {
				t.Errorf("decoding %.20q allocated %d bytes, want at most %d", tt.in, got, perRun)
			}
		})
	}

	// The same through a server: clients that announce the largest request
	// and hang up.
	t.Run("server", func(t *testing.T) {
		const clients = 50
		ignore := goleak.IgnoreCurrent()
		var g connGauge
		ts := startServer(t, &Server{MaxRequestSize: maxSize, ConnState: g.state})
		var before, after runtime.MemStats
		runtime.ReadMemStats(&before)
		for range clients {
			c := dial(t, ts.addrs[0])
			send(t, c, "1048576:policy ")
			c.Close()
		}
		if !fixture.Poll(5*time.Second, 5*time.Millisecond, func() bool { return g.ended.Load() == clients }) {
			t.Fatalf("%d of %d connections closed", g.ended.Load(), clients)
		}
		runtime.ReadMemStats(&after)
		got := after.TotalAlloc - before.TotalAlloc
		t.Logf("%d clients announcing %d bytes each: %d bytes allocated in all", clients, maxSize, got)
		if limit := uint64(clients * 64 << 10); got > limit {
			t.Errorf("%d clients announcing %d bytes each made %d bytes be allocated, want at most %d", clients, maxSize, got, limit)
		}
		stopServer(t, ts, ignore)
	})
}

// Pipelined floods are answered in order (SPEC 1.2), on one connection and
// on several at once; a client that reads slowly holds the server back
// rather than making it buffer replies.
func TestHostilePipelinedFlood(t *testing.T) {
	tests := []struct {
		name     string
		network  string
		conns    int
		requests int // per connection
	}{
		{"one connection", "tcp", 1, 100000 / pipelined},
		{"eight connections", "tcp", 8, 12500 / pipelined},
		{"eight unix connections", "unix", 8, 12500 / pipelined},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			ignore := goleak.IgnoreCurrent()
			ts := startServer(t, &Server{})
			addr := ts.addrs[0]
			if tt.network == "unix" {
				addr = ts.addrs[1]
			}
			errs := make(chan error, 2*tt.conns)
			var wg sync.WaitGroup
			for k := range tt.conns {
				c := dial(t, addr)
				c.SetDeadline(time.Now().Add(30 * time.Second))
				var req bytes.Buffer
				for i := range tt.requests {
					req.WriteString(ns("policy echo:" + strconv.Itoa(k) + "." + strconv.Itoa(i)))
				}
				// All of it in one write, while the replies are read.
				wg.Go(func() {
					if _, err := c.Write(req.Bytes()); err != nil {
						errs <- fmt.Errorf("connection %d: write: %w", k, err)
					}
				})
				wg.Go(func() {
					br := bufio.NewReader(c)
					var got []byte
					for i := range tt.requests {
						want := ns("OK policy|echo:" + strconv.Itoa(k) + "." + strconv.Itoa(i))
						got = append(got[:0], make([]byte, len(want))...)
						if _, err := io.ReadFull(br, got); err != nil || string(got) != want {
							errs <- fmt.Errorf("connection %d: reply %d: got %q, %v; want %q", k, i, got, err, want)
							return
						}
					}
				})
			}
			wg.Wait()
			close(errs)
			for err := range errs {
				t.Error(err)
			}
			stopServer(t, ts, ignore)
		})
	}

	t.Run("slow reader", func(t *testing.T) {
		const requests = 50000
		pad := strings.Repeat("x", 1000) // 50 MB of replies
		var calls atomic.Int64
		h := HandlerFunc(func(_ context.Context, _, key string) Reply {
			calls.Add(1)
			return OK(key + pad)
		})
		ignore := goleak.IgnoreCurrent()
		ts := startServer(t, &Server{Handler: h})
		c := dial(t, ts.addrs[0])
		var req bytes.Buffer
		for i := range requests {
			req.WriteString(ns("policy " + strconv.Itoa(i)))
		}
		runtime.GC()
		var before, after runtime.MemStats
		runtime.ReadMemStats(&before)
		wrote := make(chan error, 1)
		go func() {
			c.SetWriteDeadline(time.Now().Add(30 * time.Second))
			_, err := c.Write(req.Bytes())
			wrote <- err
		}()
		// The client reads nothing until the server stops answering: it
		// must, once the socket buffers are full of replies.
		last, still := int64(-1), 0
		if !fixture.Poll(10*time.Second, 5*time.Millisecond, func() bool {
			if n := calls.Load(); n != last {
				last, still = n, 0
			} else {
				still++
			}
			return still == 20 || last == requests
		}) {
			t.Fatalf("the server never stopped answering a client that reads nothing (%d answers)", calls.Load())
		}
		runtime.GC()
		runtime.ReadMemStats(&after)
		growth := int64(after.HeapAlloc) - int64(before.HeapAlloc)
		t.Logf("a client that read nothing got %d of %d requests answered (%d MB of replies) before the server waited; heap grew by %d KiB",
			last, requests, last*int64(len(pad))>>20, growth>>10)
		if last == requests {
			t.Errorf("the server answered all %d requests of a client that read nothing; want it to stop reading while it cannot write", requests)
		}
		if growth > 8<<20 {
			t.Errorf("heap grew by %d bytes while the client read nothing, want it bounded", growth)
		}
		// Then every reply, in order.
		c.SetReadDeadline(time.Now().Add(30 * time.Second))
		br := bufio.NewReader(c)
		var got []byte
		for i := range requests {
			want := ns("OK " + strconv.Itoa(i) + pad)
			got = append(got[:0], make([]byte, len(want))...)
			if _, err := io.ReadFull(br, got); err != nil || string(got) != want {
				t.Fatalf("reply %d: got %.40q, %v; want %.40q", i, got, err, want)
			}
		}
		if err := <-wrote; err != nil {
			t.Errorf("write: %v", err)
		}
		stopServer(t, ts, ignore)
	})
}
