package admin

import (
	"context"
	"encoding/json"
	"errors"
	"io"
	"maps"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"runtime"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"stsmap/internal/fixture"
	"stsmap/policycache"
	"stsmap/resolver"
)

// fakeCache is a Cache in a map. RefreshNow gives the entry a new id, or
// waits for hold when it is set.
type fakeCache struct {
	mu       sync.Mutex
	entries  map[string]*policycache.Entry
	storeErr error         // returned by Purge and PurgeAll after they purge memory
	closed   bool          // every operation fails with policycache.ErrClosed
	hold     chan struct{} // RefreshNow waits for it to close
	calls    []string
}

func newFakeCache(domains ...string) *fakeCache {
	c := &fakeCache{entries: map[string]*policycache.Entry{}}
	for _, d := range domains {
		c.entries[d] = testEntry(d)
	}
	return c
}

var testTime = time.Date(2026, 3, 1, 12, 0, 0, 0, time.FixedZone("CET", 3600))

func testEntry(domain string) *policycache.Entry {
	e := &policycache.Entry{
		Domain: domain, ID: "20260101", Reason: policycache.ReasonPolicy,
		Policy:  &resolver.Policy{Mode: resolver.ModeEnforce, MaxAge: 86400 * time.Second, MX: []string{"mx1." + domain, "*.example.net"}},
		Fetched: testTime, Expires: testTime.Add(24 * time.Hour), Checked: testTime.Add(time.Hour),
	}
	e.LastUsed.Store(testTime.Add(2 * time.Hour).Unix())
	return e
}

func (c *fakeCache) record(call string) {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.calls = append(c.calls, call)
}

func (c *fakeCache) List() []*policycache.Entry {
	c.mu.Lock()
	defer c.mu.Unlock()
	var list []*policycache.Entry
	for _, d := range slices.Sorted(maps.Keys(c.entries)) {
		list = append(list, c.entries[d])
	}
	return list
}

func (c *fakeCache) Peek(domain string) (*policycache.Entry, bool) {
	c.mu.Lock()
	defer c.mu.Unlock()
	e, ok := c.entries[domain]
	return e, ok
}

func (c *fakeCache) Purge(ctx context.Context, domain string) (bool, error) {
	c.record("purge " + domain)
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.closed {
		return false, policycache.ErrClosed
	}
	_, ok := c.entries[domain]
	delete(c.entries, domain)
	return ok, c.storeErr
}

func (c *fakeCache) PurgeAll(ctx context.Context) (int, error) {
	c.record("purge all")
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.closed {
		return 0, policycache.ErrClosed
	}
	n := len(c.entries)
	clear(c.entries)
	return n, c.storeErr
}

func (c *fakeCache) RefreshNow(ctx context.Context, domain string) (*policycache.Entry, error) {
	c.record("refresh " + domain)
	c.mu.Lock()
	hold, closed := c.hold, c.closed
	c.mu.Unlock()
	if closed {
		return nil, policycache.ErrClosed
	}
	if hold != nil {
		<-hold
	}
	e := testEntry(domain)
	e.ID = "20260202"
	c.mu.Lock()
	defer c.mu.Unlock()
	c.entries[domain] = e
	return e, nil
}

// startServer serves c on a unix socket in a temporary directory until the
// test ends, and returns the socket's path.
func startServer(t *testing.T, c Cache) string {
	t.Helper()
	sock := filepath.Join(t.TempDir(), "admin.sock")
	l, err := Listen(sock, DefaultSocketMode)
	if err != nil {
		t.Fatal(err)
	}
	srv := NewServer(c, fixture.QuietLogger())
	done := make(chan error, 1)
	go func() { done <- srv.Serve(l) }()
	t.Cleanup(func() {
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer cancel()
		if err := srv.Shutdown(ctx); err != nil {
			t.Errorf("Shutdown: %v", err)
		}
		if err := <-done; !errors.Is(err, ErrServerClosed) {
			t.Errorf("Serve after Shutdown: got %v, want ErrServerClosed", err)
		}
		if _, err := os.Lstat(sock); !errors.Is(err, os.ErrNotExist) {
			t.Errorf("socket after Shutdown: got %v, want it removed", err)
		}
	})
	return sock
}

// httpOver returns an HTTP client whose every request goes to sock.
func httpOver(sock string) *http.Client {
	return &http.Client{Transport: &http.Transport{
		DialContext: func(ctx context.Context, _, _ string) (net.Conn, error) {
			var d net.Dialer
			return d.DialContext(ctx, "unix", sock)
		},
		DisableKeepAlives: true,
	}}
}

// Each endpoint, spoken as raw HTTP: status, JSON and effect.
func TestServerEndpoints(t *testing.T) {
	c := newFakeCache("example.com", "a.example")
	hc := httpOver(startServer(t, c))
	tests := []struct {
		method, path string
		wantStatus   int
		want         map[string]any // top-level JSON fields, compared as printed
		wantCalls    []string       // cache calls made since the previous request
	}{
		{"GET", "/cache", 200, nil, nil},
		{"GET", "/cache/Example.COM.", 200, map[string]any{"domain": "example.com", "policy_id": "20260101", "mode": "enforce",
			"mx": []any{"mx1.example.com", "*.example.net"}, "max_age": 86400, "fetched": "2026-03-01T11:00:00Z",
			"expires": "2026-03-02T11:00:00Z", "checked": "2026-03-01T12:00:00Z", "last_used": "2026-03-01T13:00:00Z",
			"reason": "policy", "failed_id": nil, "failed_at": nil, "error": nil}, nil},
		{"GET", "/cache/b%C3%BCcher.example", 404, map[string]any{"error": "xn--bcher-kva.example is not cached"}, nil},
		{"GET", "/cache/.example.com", 400, map[string]any{"reason": "parent_domain"}, nil},
		{"GET", "/cache/%5B192.0.2.1%5D", 400, map[string]any{"reason": "ip_literal"}, nil},
		{"DELETE", "/cache/a%2Fb", 400, map[string]any{"reason": "path"}, nil},
		{"POST", "/cache/-bad-.example/refresh", 400, map[string]any{"reason": "invalid_name"}, nil},
		{"DELETE", "/cache", 400, map[string]any{"error": "DELETE /cache purges every cached policy: add ?all=1 to confirm"}, nil},
		{"DELETE", "/cache?all=yes", 400, nil, nil},
		{"DELETE", "/cache/EXAMPLE.com", 200, map[string]any{"domain": "example.com", "purged": 1}, []string{"purge example.com"}},
		{"DELETE", "/cache/example.com", 200, map[string]any{"domain": "example.com", "purged": 0}, []string{"purge example.com"}},
		{"POST", "/cache/example.com/refresh", 200, map[string]any{"domain": "example.com", "policy_id": "20260202"}, []string{"refresh example.com"}},
		{"GET", "/cache/example.com", 200, map[string]any{"policy_id": "20260202"}, nil},
		{"PUT", "/cache", 405, nil, nil},
		{"GET", "/cache/example.com/refresh", 405, nil, nil},
		{"GET", "/metrics", 404, nil, nil},
		{"DELETE", "/cache?all=1", 200, map[string]any{"purged": 2, "domain": nil}, []string{"purge all"}},
		{"GET", "/cache", 200, map[string]any{"entries": []any{}}, nil},
	}
	for _, tt := range tests {
		req, err := http.NewRequestWithContext(t.Context(), tt.method, "http://admin"+tt.path, nil)
		if err != nil {
			t.Fatal(err)
		}
		resp, err := hc.Do(req)
		if err != nil {
			t.Fatalf("%s %s: %v", tt.method, tt.path, err)
		}
		body, _ := io.ReadAll(resp.Body)
		resp.Body.Close()
		if resp.StatusCode != tt.wantStatus {
			t.Errorf("%s %s: got status %d, want %d (%s)", tt.method, tt.path, resp.StatusCode, tt.wantStatus, body)
			continue
		}
		var got map[string]any
		if tt.want != nil {
			if err := json.Unmarshal(body, &got); err != nil {
				t.Fatalf("%s %s: %v in %s", tt.method, tt.path, err, body)
			}
		}
		for k, want := range tt.want {
			if g, w := printJSON(got[k]), printJSON(want); g != w {
				t.Errorf("%s %s: %s: got %s, want %s", tt.method, tt.path, k, g, w)
			}
		}
		c.mu.Lock()
		calls := c.calls
		c.calls = nil
		c.mu.Unlock()
		if !slices.Equal(calls, tt.wantCalls) {
			t.Errorf("%s %s: cache calls: got %q, want %q", tt.method, tt.path, calls, tt.wantCalls)
		}
	}
}

func printJSON(v any) string {
	b, _ := json.Marshal(v)
	return string(b)
}

func TestListJSON(t *testing.T) {
	hc := httpOver(startServer(t, newFakeCache("example.com", "a.example")))
	resp, err := hc.Get("http://admin/cache")
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	if ct := resp.Header.Get("Content-Type"); ct != "application/json" {
		t.Errorf("Content-Type: got %q, want application/json", ct)
	}
	var got struct{ Entries []Entry }
	if err := json.NewDecoder(resp.Body).Decode(&got); err != nil {
		t.Fatal(err)
	}
	if len(got.Entries) != 2 || got.Entries[0].Domain != "a.example" || got.Entries[1].Domain != "example.com" {
		t.Errorf("GET /cache: got %+v, want a.example and example.com in order", got.Entries)
	}
}

// An entry without a policy leaves out the policy's fields and says why.
func TestEntryOfNegative(t *testing.T) {
	e := &policycache.Entry{Domain: "broken.example", ID: "1", Reason: policycache.ReasonFetchFailed,
		Err: "fetch: 404", Fetched: testTime, Expires: testTime.Add(5 * time.Minute)}
	b, err := json.Marshal(EntryOf(e))
	if err != nil {
		t.Fatal(err)
	}
	want := `{"domain":"broken.example","policy_id":"1","fetched":"2026-03-01T11:00:00Z","expires":"2026-03-01T11:05:00Z",` +
		`"reason":"fetch_failed","error":"fetch: 404"}`
	if string(b) != want {
		t.Errorf("JSON:\n got %s\nwant %s", b, want)
	}
}

func TestSocketMode(t *testing.T) {
	for _, mode := range []os.FileMode{DefaultSocketMode, 0o660} {
		sock := filepath.Join(t.TempDir(), "sub", "admin.sock")
		l, err := Listen(sock, mode)
		if err != nil {
			t.Fatal(err)
		}
		st, err := os.Stat(sock)
		if err != nil || st.Mode().Perm() != mode {
			t.Errorf("socket mode: got %v (%v), want %v", st.Mode().Perm(), err, mode)
		}
		if st, err := os.Stat(filepath.Dir(sock)); err != nil || st.Mode().Perm() != 0o700 {
			t.Errorf("created directory: got mode %v (%v), want 0700", st.Mode().Perm(), err)
		}
		l.Close()
	}
}

func TestListenReplacesOnlyStaleSockets(t *testing.T) {
	dir := t.TempDir()
	sock := filepath.Join(dir, "admin.sock")
	// A daemon that died left its socket file.
	stale, err := net.ListenUnix("unix", &net.UnixAddr{Name: sock, Net: "unix"})
	if err != nil {
		t.Fatal(err)
	}
	stale.SetUnlinkOnClose(false)
	stale.Close()
	l, err := Listen(sock, DefaultSocketMode)
	if err != nil {
		t.Fatalf("Listen over a stale socket: %v", err)
	}
	defer l.Close()
	// A live one is left alone.
	if _, err := Listen(sock, DefaultSocketMode); err == nil || !strings.Contains(err.Error(), "in use") {
		t.Errorf("Listen over a live socket: got %v, want an in-use error", err)
	}
	// So is a file that is no socket.
	file := filepath.Join(dir, "file")
	if err := os.WriteFile(file, nil, 0o600); err != nil {
		t.Fatal(err)
	}
	if _, err := Listen(file, DefaultSocketMode); err == nil || !strings.Contains(err.Error(), "not a socket") {
		t.Errorf("Listen over a file: got %v, want a not-a-socket error", err)
	}
	if _, err := os.Stat(file); err != nil {
		t.Errorf("the file was removed: %v", err)
	}
	long := filepath.Join(dir, strings.Repeat("x", 120), "admin.sock")
	if _, err := Listen(long, DefaultSocketMode); err == nil || !strings.Contains(err.Error(), "bytes long") {
		t.Errorf("Listen on a path too long: got %v, want it to say so", err)
	}
}

// Shutdown lets a refresh in flight finish, and leaves no goroutine behind.
func TestShutdownWaitsForRequestInFlight(t *testing.T) {
	c := newFakeCache()
	c.hold = make(chan struct{})
	sock := filepath.Join(t.TempDir(), "admin.sock")
	l, err := Listen(sock, DefaultSocketMode)
	if err != nil {
		t.Fatal(err)
	}
	srv := NewServer(c, fixture.QuietLogger())
	served := make(chan error, 1)
	go func() { served <- srv.Serve(l) }()

	answered := make(chan error, 1)
	go func() {
		_, err := (&Client{Socket: sock}).Refresh(context.Background(), "example.com")
		answered <- err
	}()
	for { // until the refresh is in the cache's hands
		c.mu.Lock()
		n := len(c.calls)
		c.mu.Unlock()
		if n > 0 {
			break
		}
		runtime.Gosched()
	}
	shut := make(chan error, 1)
	go func() { shut <- srv.Shutdown(context.Background()) }()
	select {
	case err := <-shut:
		t.Fatalf("Shutdown returned %v with a refresh in flight", err)
	case <-time.After(50 * time.Millisecond):
	}
	close(c.hold)
	if err := <-answered; err != nil {
		t.Errorf("refresh in flight: %v", err)
	}
	if err := <-shut; err != nil {
		t.Errorf("Shutdown: %v", err)
	}
	if err := <-served; !errors.Is(err, ErrServerClosed) {
		t.Errorf("Serve: got %v, want ErrServerClosed", err)
	}
	checkNoGoroutines(t, "net/http.(*conn).serve", "stsmap/admin.")
}

// checkNoGoroutines fails the test if a goroutine's stack mentions any of
// frames; one that has just ended may still be unwinding, so it looks again
// for a while.
func checkNoGoroutines(t *testing.T, frames ...string) {
	t.Helper()
	deadline := time.Now().Add(5 * time.Second)
	for {
		buf := make([]byte, 1<<20)
		stacks := string(buf[:runtime.Stack(buf, true)])
		// This test's own goroutine is in stsmap/admin.Test...; skip it.
		stacks = strings.ReplaceAll(stacks, "stsmap/admin.Test", "")
		stacks = strings.ReplaceAll(stacks, "stsmap/admin.checkNoGoroutines", "")
		if !slices.ContainsFunc(frames, func(f string) bool { return strings.Contains(stacks, f) }) {
			return
		}
		if time.Now().After(deadline) {
			t.Errorf("goroutines left:\n%s", stacks)
			return
		}
		runtime.Gosched()
	}
}
