package socketmap

import (
	"context"
	"errors"
	"io"
	"io/fs"
	"log/slog"
	"net"
	"os"
	"path/filepath"
	"runtime"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"stsmap/internal/fixture"
)

// testHandler picks its reply from the key, so that each wire test chooses
// the reply through the request it sends.
func testHandler(ctx context.Context, name, key string) Reply {
	switch {
	case key == "found":
		return OK("secure match=.example.net")
	case key == "temp":
		return Temp("internal fault")
	case key == "empty":
		return OK("")
	case key == "huge":
		return OK(strings.Repeat("x", DefaultMaxReplySize))
	case key == "badword":
		return Reply{Word: "ok", Data: "x"}
	case key == "panic":
		panic("test panic")
	case strings.HasPrefix(key, "echo:"):
		return OK(name + "|" + key)
	case strings.HasPrefix(key, "size:"):
		n, _ := strconv.Atoi(strings.TrimPrefix(key, "size:"))
		return OK(strings.Repeat("x", n))
	}
	return NotFound()
}

// ns encodes s as a netstring, independently of AppendNetstring.
func ns(s string) string { return strconv.Itoa(len(s)) + ":" + s + "," }

const notFound = "9:NOTFOUND ,"

// testServer is a Server serving real listeners in the background.
type testServer struct {
	*Server
	addrs    []string // "127.0.0.1:port" or "unix:/path"
	errs     chan error
	logs     *fixture.SyncBuffer
	waitOnce sync.Once
}

// startServer serves s on a TCP and a unix socket. At cleanup it shuts s
// down, checks that Serve returned ErrServerClosed and that no server
// goroutine is left.
func startServer(t *testing.T, s *Server) *testServer {
	t.Helper()
	ts := &testServer{Server: s, logs: &fixture.SyncBuffer{}}
	if s.Handler == nil {
		s.Handler = HandlerFunc(testHandler)
	}
	s.Logger = slog.New(slog.NewTextHandler(ts.logs, &slog.HandlerOptions{Level: slog.LevelDebug}))
	listenAddrs := []string{"127.0.0.1:0", "unix:" + filepath.Join(t.TempDir(), "stsmap.sock")}
	ts.errs = make(chan error, len(listenAddrs))
	for _, addr := range listenAddrs {
		l, err := Listen(addr, 0o600)
		if err != nil {
			t.Fatal(err)
		}
		if l.Addr().Network() == "unix" {
			ts.addrs = append(ts.addrs, "unix:"+l.Addr().String())
		} else {
			ts.addrs = append(ts.addrs, l.Addr().String())
		}
		// Serve may start after the first dial: the listen queue holds it.
		go func() { ts.errs <- s.Serve(l) }()
	}
	t.Cleanup(func() {
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		if err := s.Shutdown(ctx); err != nil {
			t.Errorf("Shutdown: %v", err)
		}
		ts.wait(t)
		if t.Failed() {
			t.Logf("server log:\n%s", ts.logs)
		}
	})
	return ts
}

// wait waits for every Serve call to return ErrServerClosed and for the
// server's goroutines to end.
func (ts *testServer) wait(t *testing.T) {
	t.Helper()
	ts.waitOnce.Do(func() {
		for range ts.addrs {
			if err := <-ts.errs; !errors.Is(err, ErrServerClosed) {
				t.Errorf("Serve returned %v, want ErrServerClosed", err)
			}
		}
		checkGoroutines(t)
	})
}

// checkGoroutines waits, for a generous while, until no goroutine runs
// server code, and fails if some still do.
func checkGoroutines(t *testing.T) {
	t.Helper()
	deadline := time.Now().Add(5 * time.Second)
	tick := time.NewTicker(5 * time.Millisecond)
	defer tick.Stop()
	for {
		left := serverGoroutines()
		if left == "" {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("server goroutines left after shutdown:\n%s", left)
		}
		<-tick.C
	}
}

func serverGoroutines() string {
	buf := make([]byte, 1<<20)
	buf = buf[:runtime.Stack(buf, true)]
	var left []string
	for _, g := range strings.Split(string(buf), "\n\n") {
		if strings.Contains(g, "socketmap.(*Server)") || strings.Contains(g, "socketmap.(*conn)") {
			left = append(left, g)
		}
	}
	return strings.Join(left, "\n\n")
}

func dial(t *testing.T, addr string) net.Conn {
	t.Helper()
	network := "tcp"
	if path, ok := strings.CutPrefix(addr, "unix:"); ok {
		network, addr = "unix", path
	}
	c, err := net.Dial(network, addr)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	return c
}

func send(t *testing.T, c net.Conn, s string) {
	t.Helper()
	if _, err := io.WriteString(c, s); err != nil {
		t.Fatalf("write %q: %v", s, err)
	}
}

// expect reads exactly the bytes of want, waiting for them generously.
func expect(t *testing.T, c net.Conn, want string) {
	t.Helper()
	c.SetReadDeadline(time.Now().Add(5 * time.Second))
	got := make([]byte, len(want))
	n, err := io.ReadFull(c, got)
	if err != nil {
		t.Fatalf("read: %v after %q, want %q", err, got[:n], want)
	}
	if string(got) != want {
		t.Fatalf("got %q, want %q", got, want)
	}
}

// expectClosed waits, generously, for the server to close c without
// sending anything more.
func expectClosed(t *testing.T, c net.Conn) {
	t.Helper()
	c.SetReadDeadline(time.Now().Add(5 * time.Second))
	got, err := io.ReadAll(c)
	if err != nil && !errors.Is(err, syscall.ECONNRESET) {
		t.Fatalf("read: %v, want the connection closed", err)
	}
	if len(got) > 0 {
		t.Fatalf("got %q, want the connection closed", got)
	}
}

func TestServeReplies(t *testing.T) {
	tests := []struct {
		name   string
		req    string
		want   string
		closes bool
	}{
		{"ok", ns("policy found"), ns("OK secure match=.example.net"), false},
		{"notfound", ns("policy example.com"), notFound, false},
		{"temp", ns("policy temp"), ns("TEMP internal fault"), false},
		{"split at first space", ns("postfix echo:a b c"), ns("OK postfix|echo:a b c"), false},
		{"empty key", ns("policy "), notFound, false},
		{"ok without data", ns("policy empty"), ns("TEMP empty reply"), false},
		{"unknown word", ns("policy badword"), ns("TEMP internal error"), false},
		{"reply too large", ns("policy huge"), ns("TEMP reply too large"), false},
		{"handler panic", ns("policy panic"), ns("TEMP internal error"), true},
		{"leading zero", "01:a,", "", true},
		{"non-digit length", "x:a,", "", true},
		{"missing comma", ns("policy found")[:15] + ";", "", true},
		{"request over max", "10001:", "", true},
		{"endless length", strings.Repeat("9", 100), "", true},
		{"no space", ns("policy"), "", true},
		{"no map name", ns(" example.com"), "", true},
	}
	ts := startServer(t, &Server{})
	for _, addr := range ts.addrs {
		for _, tt := range tests {
			t.Run(strings.SplitN(addr, ":", 2)[0]+"/"+tt.name, func(t *testing.T) {
				c := dial(t, addr)
				send(t, c, tt.req)
				expect(t, c, tt.want)
				if tt.closes {
					expectClosed(t, c)
					return
				}
				// The connection goes on serving.
				send(t, c, ns("policy x"))
				expect(t, c, notFound)
			})
		}
	}
}

func TestServeConversation(t *testing.T) {
	type exchange struct{ send, want string }
	var (
		found = exchange{ns("policy found"), ns("OK secure match=.example.net")}
		nf    = exchange{ns("policy a.example"), notFound}
		echo  = exchange{ns("other echo:x"), ns("OK other|echo:x")}
	)
	tests := []struct {
		name     string
		steps    []exchange
		bytewise bool // send each byte in its own write
	}{
		{"sequential", []exchange{found, nf, echo, found, nf}, false},
		{"pipelined", []exchange{{found.send + nf.send + echo.send + found.send, found.want + nf.want + echo.want + found.want}}, false},
		// The first reply must come without the rest of the second request.
		{"pipelined then partial", []exchange{{found.send + echo.send[:4], found.want}, {echo.send[4:], echo.want}}, false},
		{"byte by byte", []exchange{found, nf, echo}, true},
		{"pipelined byte by byte", []exchange{{found.send + nf.send, found.want + nf.want}}, true},
	}
	ts := startServer(t, &Server{})
	for _, addr := range ts.addrs {
		for _, tt := range tests {
			t.Run(strings.SplitN(addr, ":", 2)[0]+"/"+tt.name, func(t *testing.T) {
				c := dial(t, addr)
				for _, step := range tt.steps {
					if tt.bytewise {
						for i := range len(step.send) {
							send(t, c, step.send[i:i+1])
						}
					} else {
						send(t, c, step.send)
					}
					expect(t, c, step.want)
				}
			})
		}
	}
}

func TestServeReplySizeLimit(t *testing.T) {
	// An encoded reply must be shorter than MaxReplySize: "15:OK " plus
	// 12 bytes of data and "," is 19 bytes.
	tests := []struct {
		size int
		want string
	}{
		{12, ns("OK " + strings.Repeat("x", 12))},
		{13, ns("TEMP reply too large")},
	}
	ts := startServer(t, &Server{MaxReplySize: 20})
	c := dial(t, ts.addrs[0])
	for _, tt := range tests {
		send(t, c, ns("policy size:"+strconv.Itoa(tt.size)))
		expect(t, c, tt.want)
	}
	if got, want := ts.logs.String(), "reply too large"; !strings.Contains(got, want) {
		t.Errorf("log %q does not mention %q", got, want)
	}
}

func TestServeMalformedClosesOnlyThatConnection(t *testing.T) {
	ts := startServer(t, &Server{})
	good := dial(t, ts.addrs[0])
	send(t, good, ns("policy found"))
	expect(t, good, ns("OK secure match=.example.net"))

	bad := dial(t, ts.addrs[0])
	send(t, bad, "01:"+strings.Repeat("A", 1000))
	expectClosed(t, bad)

	send(t, good, ns("policy found"))
	expect(t, good, ns("OK secure match=.example.net"))

	logs := ts.logs.String()
	for _, want := range []string{"level=WARN", "malformed", "remote=127.0.0.1:", "leading zero"} {
		if !strings.Contains(logs, want) {
			t.Errorf("log %q does not contain %q", logs, want)
		}
	}
	if strings.Contains(logs, "AAAA") {
		t.Errorf("log %q repeats the request", logs)
	}
}

func TestServeHandlerPanic(t *testing.T) {
	ts := startServer(t, &Server{})
	c := dial(t, ts.addrs[0])
	send(t, c, ns("policy panic"))
	expect(t, c, ns("TEMP internal error"))
	expectClosed(t, c)

	c = dial(t, ts.addrs[0])
	send(t, c, ns("policy found"))
	expect(t, c, ns("OK secure match=.example.net"))
	if got, want := ts.logs.String(), "test panic"; !strings.Contains(got, want) {
		t.Errorf("log %q does not contain %q", got, want)
	}
}

func TestServeIdleTimeout(t *testing.T) {
	tests := []struct {
		name string
		send string
	}{
		{"silent", ""},
		{"after a request", ns("policy x")},
		{"inside a request", "12:policy"},
	}
	ts := startServer(t, &Server{IdleTimeout: 50 * time.Millisecond})
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			c := dial(t, ts.addrs[0])
			send(t, c, tt.send)
			if strings.HasSuffix(tt.send, ",") {
				expect(t, c, notFound)
			}
			expectClosed(t, c)
		})
	}
}

func TestServeMaxConns(t *testing.T) {
	ts := startServer(t, &Server{MaxConns: 2})
	first, second := dial(t, ts.addrs[0]), dial(t, ts.addrs[1])
	for _, c := range []net.Conn{first, second} {
		send(t, c, ns("policy x"))
		expect(t, c, notFound)
	}

	third := dial(t, ts.addrs[0]) // accepted, then held without a slot
	send(t, third, ns("policy x"))
	third.SetReadDeadline(time.Now().Add(100 * time.Millisecond))
	var ne net.Error
	if n, err := third.Read(make([]byte, 1)); !errors.As(err, &ne) || !ne.Timeout() {
		t.Fatalf("third connection read %d bytes, err %v; want no reply while two are open", n, err)
	}
	// Established clients keep being served at the limit.
	send(t, second, ns("policy x"))
	expect(t, second, notFound)

	first.Close()
	expect(t, third, notFound)
}

// ConnState sees each served connection start and end, and nothing is left
// open after Shutdown.
func TestServeConnState(t *testing.T) {
	var mu sync.Mutex
	open, started := 0, 0
	ended := make(chan struct{}, 2)
	ts := startServer(t, &Server{ConnState: func(delta int) {
		mu.Lock()
		defer mu.Unlock()
		open += delta
		if delta > 0 {
			started += delta
		} else {
			ended <- struct{}{}
		}
	}})
	counts := func() (int, int) {
		mu.Lock()
		defer mu.Unlock()
		return open, started
	}
	first, second := dial(t, ts.addrs[0]), dial(t, ts.addrs[1])
	for _, c := range []net.Conn{first, second} {
		send(t, c, ns("policy x"))
		expect(t, c, notFound)
	}
	if o, s := counts(); o != 2 || s != 2 {
		t.Errorf("two clients served: got %d open, %d started; want 2, 2", o, s)
	}
	first.Close()
	select {
	case <-ended:
	case <-time.After(5 * time.Second):
		t.Fatal("no ConnState(-1) within 5s of a client hanging up")
	}
	if o, _ := counts(); o != 1 {
		t.Errorf("after one client hung up: got %d open, want 1", o)
	}
	ctx, cancel := context.WithTimeout(t.Context(), 5*time.Second)
	defer cancel()
	if err := ts.Shutdown(ctx); err != nil {
		t.Fatalf("Shutdown: %v", err)
	}
	ts.wait(t)
	if o, s := counts(); o != 0 || s != 2 {
		t.Errorf("after Shutdown: got %d open, %d started; want 0, 2", o, s)
	}
}

func TestShutdownWaitsForInFlight(t *testing.T) {
	entered, release := make(chan struct{}), make(chan struct{})
	h := HandlerFunc(func(ctx context.Context, name, key string) Reply {
		if key == "slow" {
			close(entered)
			<-release
			return OK("done")
		}
		return NotFound()
	})
	ts := startServer(t, &Server{Handler: h})
	idle := dial(t, ts.addrs[0])
	send(t, idle, ns("policy x"))
	expect(t, idle, notFound)
	busy := dial(t, ts.addrs[1])
	send(t, busy, ns("policy slow"))
	<-entered

	shutdown := make(chan error, 1)
	go func() { shutdown <- ts.Shutdown(context.Background()) }()
	expectClosed(t, idle) // idle connections close at once
	select {
	case err := <-shutdown:
		t.Fatalf("Shutdown returned %v before the in-flight reply was written", err)
	default:
	}

	close(release)
	expect(t, busy, ns("OK done"))
	expectClosed(t, busy)
	if err := <-shutdown; err != nil {
		t.Errorf("Shutdown: %v", err)
	}
	ts.wait(t)
	if _, err := net.Dial("tcp", ts.addrs[0]); err == nil {
		t.Errorf("dial after Shutdown succeeded, want the listener closed")
	}
}

func TestShutdownContextEnds(t *testing.T) {
	entered := make(chan struct{})
	cancelled := make(chan error, 1)
	h := HandlerFunc(func(ctx context.Context, name, key string) Reply {
		close(entered)
		<-ctx.Done()
		cancelled <- ctx.Err()
		return Temp("cancelled")
	})
	ts := startServer(t, &Server{Handler: h})
	c := dial(t, ts.addrs[0])
	send(t, c, ns("policy slow"))
	<-entered

	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	if err := ts.Shutdown(ctx); !errors.Is(err, context.Canceled) {
		t.Errorf("Shutdown = %v, want context.Canceled", err)
	}
	if err := <-cancelled; !errors.Is(err, context.Canceled) {
		t.Errorf("handler context ended with %v, want context.Canceled", err)
	}
	expectClosed(t, c)
	ts.wait(t)
}

func TestClose(t *testing.T) {
	ts := startServer(t, &Server{})
	c := dial(t, ts.addrs[1])
	send(t, c, ns("policy x"))
	expect(t, c, notFound)
	if err := ts.Close(); err != nil {
		t.Errorf("Close: %v", err)
	}
	expectClosed(t, c)
	ts.wait(t)
}

func TestServeAfterShutdown(t *testing.T) {
	s := &Server{Handler: HandlerFunc(testHandler)}
	if err := s.Shutdown(context.Background()); err != nil {
		t.Fatalf("Shutdown: %v", err)
	}
	l, err := Listen("127.0.0.1:0", 0)
	if err != nil {
		t.Fatal(err)
	}
	if err := s.Serve(l); !errors.Is(err, ErrServerClosed) {
		t.Errorf("Serve = %v, want ErrServerClosed", err)
	}
	if _, err := net.Dial("tcp", l.Addr().String()); err == nil {
		t.Errorf("dial succeeded, want Serve to close the listener")
	}
}

func TestListenUnixMode(t *testing.T) {
	for _, mode := range []fs.FileMode{0o600, 0o660, 0o666} {
		path := filepath.Join(t.TempDir(), "s.sock")
		l, err := Listen("unix:"+path, mode)
		if err != nil {
			t.Fatal(err)
		}
		fi, err := os.Stat(path)
		l.Close()
		if err != nil {
			t.Fatal(err)
		}
		if got := fi.Mode(); got.Type() != fs.ModeSocket || got.Perm() != mode {
			t.Errorf("Listen with mode %v made %v, want a socket with %v", mode, got, mode)
		}
	}
}

func TestListenUnixExisting(t *testing.T) {
	tests := []struct {
		name    string
		create  func(t *testing.T, path string)
		wantErr bool
	}{
		{"stale socket", func(t *testing.T, path string) {
			l, err := net.Listen("unix", path)
			if err != nil {
				t.Fatal(err)
			}
			l.(*net.UnixListener).SetUnlinkOnClose(false)
			l.Close()
		}, false},
		{"live socket", func(t *testing.T, path string) {
			l, err := net.Listen("unix", path)
			if err != nil {
				t.Fatal(err)
			}
			t.Cleanup(func() { l.Close() })
		}, true},
		{"regular file", func(t *testing.T, path string) {
			if err := os.WriteFile(path, []byte("keep me"), 0o600); err != nil {
				t.Fatal(err)
			}
		}, true},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			path := filepath.Join(t.TempDir(), "s.sock")
			tt.create(t, path)
			l, err := Listen("unix:"+path, 0o600)
			if gotErr := err != nil; gotErr != tt.wantErr {
				t.Fatalf("Listen error = %v, want error: %v", err, tt.wantErr)
			}
			if l != nil {
				l.Close()
			}
			if _, err := os.Lstat(path); tt.wantErr && err != nil {
				t.Errorf("Listen removed %s: %v", tt.name, err)
			}
		})
	}
}

func BenchmarkServeConn(b *testing.B) {
	reply := OK("secure match=.example.net servername=hostname")
	s := &Server{
		Handler: HandlerFunc(func(ctx context.Context, name, key string) Reply { return reply }),
		Logger:  slog.New(slog.DiscardHandler),
	}
	l, err := Listen("127.0.0.1:0", 0)
	if err != nil {
		b.Fatal(err)
	}
	done := make(chan error, 1)
	go func() { done <- s.Serve(l) }()
	c, err := net.Dial("tcp", l.Addr().String())
	if err != nil {
		b.Fatal(err)
	}
	defer c.Close()
	req := []byte(ns("postfix example.com"))
	resp := make([]byte, len(AppendReply(nil, reply)))
	b.ReportAllocs()
	for b.Loop() {
		if _, err := c.Write(req); err != nil {
			b.Fatal(err)
		}
		if _, err := io.ReadFull(c, resp); err != nil {
			b.Fatal(err)
		}
	}
	b.StopTimer()
	if err := s.Shutdown(context.Background()); err != nil {
		b.Fatal(err)
	}
	<-done
}
