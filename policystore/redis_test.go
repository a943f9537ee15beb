package policystore

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"reflect"
	"runtime"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/redis/go-redis/v9"

	"stsmap/internal/fixture"
	"stsmap/policycache"
	"stsmap/resolver"
)

// redisServer is a fixture redis-server the test can stop and restart.
type redisServer struct {
	*fixture.Redis
	t *testing.T
}

// startRedis runs Debian's redis-server on a free loopback port, without
// persistence, and returns once it answers PING. It stops with the test.
func startRedis(t *testing.T) *redisServer {
	t.Helper()
	bin := fixture.RequireTool(t, "redis-server", "redis-server")
	return &redisServer{Redis: fixture.StartRedis(t, bin, t.TempDir()), t: t}
}

func (s *redisServer) start()               { s.t.Helper(); s.Start(s.t) }
func (s *redisServer) stop()                { s.Stop() }
func (s *redisServer) signal(sig os.Signal) { s.t.Helper(); s.Signal(s.t, sig) }

// raw returns a plain go-redis client for the test to look behind the store.
func (s *redisServer) raw() *redis.Client {
	s.t.Helper()
	o, err := redis.ParseURL(s.URL)
	if err != nil {
		s.t.Fatal(err)
	}
	c := redis.NewClient(o)
	s.t.Cleanup(func() { c.Close() })
	return c
}

// openTestRedis opens a store on s that closes with the test; its log lines
// go to the returned buffer.
func openTestRedis(t *testing.T, s *redisServer, prefix string) (*Redis, *fixture.SyncBuffer) {
	t.Helper()
	logs := &fixture.SyncBuffer{}
	r, err := OpenRedis(RedisOptions{
		URL: s.URL, Prefix: prefix, ProbeInterval: 50 * time.Millisecond,
		Logger: slog.New(slog.NewTextHandler(logs, &slog.HandlerOptions{Level: slog.LevelDebug})),
	})
	if err != nil {
		t.Fatalf("OpenRedis: %v", err)
	}
	t.Cleanup(func() { r.Close() })
	return r, logs
}

// redisTestEntry is an entry with an enforce policy that expires in ttl.
func redisTestEntry(domain string, ttl time.Duration) *policycache.Entry {
	now := time.Now().Truncate(time.Second)
	e := &policycache.Entry{
		Domain: domain, ID: "20260101T000000", Reason: policycache.ReasonPolicy,
		Policy: &resolver.Policy{
			Mode: resolver.ModeEnforce, MaxAge: 86400 * time.Second,
			MX:    []string{"mx1." + domain, "*.mx." + domain},
			Lines: []string{"version: STSv1", "mode: enforce", "mx: mx1." + domain, "mx: *.mx." + domain, "max_age: 86400"},
		},
		Fetched: now, Expires: now.Add(ttl),
	}
	e.LastUsed.Store(now.Unix())
	return e
}

func sameRedisEntry(t *testing.T, got, want *policycache.Entry) {
	t.Helper()
	switch {
	case got == nil:
		t.Fatalf("got no entry, want %s", want.Domain)
	case got.Domain != want.Domain || got.ID != want.ID,
		!got.Fetched.Equal(want.Fetched) || !got.Expires.Equal(want.Expires),
		got.LastUsed.Load() != want.LastUsed.Load(),
		got.Policy.Mode != want.Policy.Mode || got.Policy.MaxAge != want.Policy.MaxAge,
		!reflect.DeepEqual(got.Policy.MX, want.Policy.MX), !reflect.DeepEqual(got.Policy.Lines, want.Policy.Lines):
		t.Fatalf("got %+v %+v, want %+v %+v", got, got.Policy, want, want.Policy)
	}
}

// waitFor polls cond until it holds, failing the test after timeout.
func waitFor(t *testing.T, timeout time.Duration, what string, cond func() bool) {
	t.Helper()
	if !fixture.Poll(timeout, 10*time.Millisecond, cond) {
		t.Fatalf("%s: not within %v", what, timeout)
	}
}

func TestRedisPutGetDelete(t *testing.T) {
	s := startRedis(t)
	r, _ := openTestRedis(t, s, "t:")
	raw := s.raw()
	ctx := context.Background()

	want := redisTestEntry("example.com", time.Hour)
	if err := r.Put(ctx, want); err != nil {
		t.Fatalf("Put: %v", err)
	}
	got, err := r.Get(ctx, "example.com")
	if err != nil {
		t.Fatalf("Get: %v", err)
	}
	sameRedisEntry(t, got, want)

	// The key expires with its policy.
	ttl, err := raw.PTTL(ctx, "t:policy:example.com").Result()
	if err != nil {
		t.Fatal(err)
	}
	if d := time.Until(want.Expires) - ttl; d < -time.Second || d > time.Second {
		t.Errorf("PTTL %v, want %v within a second", ttl, time.Until(want.Expires))
	}

	if got, err := r.Get(ctx, "missing.example"); got != nil || err != nil {
		t.Errorf("Get(missing) = %v, %v; want nil, nil", got, err)
	}
	if err := r.Delete(ctx, "example.com"); err != nil {
		t.Fatalf("Delete: %v", err)
	}
	if got, err := r.Get(ctx, "example.com"); got != nil || err != nil {
		t.Errorf("Get after Delete = %v, %v; want nil, nil", got, err)
	}
	if err := r.Delete(ctx, "example.com"); err != nil {
		t.Errorf("Delete(missing) = %v, want nil", err)
	}
	if err := r.Put(ctx, &policycache.Entry{Domain: "negative.example"}); err == nil {
		t.Error("Put of an entry without policy: no error")
	}
	if !r.Available() {
		t.Error("Available() = false after successful calls")
	}
}

func TestRedisGetBadRecords(t *testing.T) {
	s := startRedis(t)
	r, logs := openTestRedis(t, s, "t:")
	raw := s.raw()
	ctx := context.Background()

	other, err := Encode(redisTestEntry("other.example", time.Hour))
	if err != nil {
		t.Fatal(err)
	}
	newer := []byte(`{"v":99,"domain":"newer.example"}`)
	for key, val := range map[string][]byte{
		"t:policy:garbage.example": []byte("{not json"),
		"t:policy:swapped.example": other, // must never answer for swapped.example
		"t:policy:newer.example":   newer,
	} {
		if err := raw.Set(ctx, key, val, 0).Err(); err != nil {
			t.Fatal(err)
		}
	}
	tests := []struct {
		domain   string
		wantKept bool
	}{
		{"garbage.example", false},
		{"swapped.example", false},
		{"newer.example", true},
	}
	for _, tt := range tests {
		got, err := r.Get(ctx, tt.domain)
		if got != nil || err != nil {
			t.Errorf("Get(%s) = %v, %v; want nil, nil", tt.domain, got, err)
		}
		n, err := raw.Exists(ctx, "t:policy:"+tt.domain).Result()
		if err != nil {
			t.Fatal(err)
		}
		if got := n == 1; got != tt.wantKept {
			t.Errorf("%s: record kept %v, want %v", tt.domain, got, tt.wantKept)
		}
	}
	if got := strings.Count(logs.String(), "dropping undecodable policy record"); got != 2 {
		t.Errorf("%d warnings about undecodable records, want 2:\n%s", got, logs)
	}

	// An error reply is no outage.
	if err := raw.LPush(ctx, "t:policy:list.example", "x").Err(); err != nil {
		t.Fatal(err)
	}
	_, err = r.Get(ctx, "list.example")
	if err == nil || errors.Is(err, policycache.ErrStoreUnavailable) {
		t.Errorf("Get(WRONGTYPE) error = %v, want a plain error", err)
	}
	if !r.Available() {
		t.Error("WRONGTYPE opened the breaker")
	}
}

func TestRedisClaim(t *testing.T) {
	s := startRedis(t)
	mta1, _ := openTestRedis(t, s, "t:")
	mta2, _ := openTestRedis(t, s, "t:")
	ctx := context.Background()
	const period = 200 * time.Millisecond

	claim := func(r *Redis, domain string) bool {
		t.Helper()
		ok, err := r.Claim(ctx, domain, period)
		if err != nil {
			t.Fatalf("Claim(%s): %v", domain, err)
		}
		return ok
	}
	if !claim(mta1, "example.com") {
		t.Fatal("first Claim = false, want true")
	}
	if claim(mta1, "example.com") {
		t.Error("second Claim by the same MTA = true, want false")
	}
	if claim(mta2, "example.com") {
		t.Error("Claim by another MTA = true, want false")
	}
	if !claim(mta2, "example.net") {
		t.Error("Claim of another domain = false, want true")
	}
	owner, err := s.raw().Get(ctx, "t:refresh:example.com").Result()
	if err != nil {
		t.Fatal(err)
	}
	host, _ := os.Hostname()
	if want := host + ":" + strconv.Itoa(os.Getpid()); owner != want {
		t.Errorf("claim owner %q, want %q", owner, want)
	}
	waitFor(t, 5*time.Second, "Claim after the period", func() bool { return claim(mta2, "example.com") })
}

func TestRedisLoad(t *testing.T) {
	s := startRedis(t)
	writer, _ := openTestRedis(t, s, "t:")
	raw := s.raw()
	ctx := context.Background()

	want := map[string]*policycache.Entry{}
	for i := range 1200 { // more than one SCAN page and MGET batch
		e := redisTestEntry(fmt.Sprintf("d%d.example", i), time.Hour)
		want[e.Domain] = e
		if err := writer.Put(ctx, e); err != nil {
			t.Fatalf("Put: %v", err)
		}
	}
	expired := redisTestEntry("expired.example", time.Hour)
	expired.Fetched = time.Now().Add(-2 * time.Hour).Truncate(time.Second)
	expired.Expires = expired.Fetched.Add(time.Hour)
	b, err := Encode(expired)
	if err != nil {
		t.Fatal(err)
	}
	for key, val := range map[string][]byte{
		"t:policy:expired.example": b, // without TTL, as a foreign writer might
		"t:policy:garbage.example": []byte("\x00garbage"),
		"u:policy:foreign.example": b, // another prefix
	} {
		if err := raw.Set(ctx, key, val, 0).Err(); err != nil {
			t.Fatal(err)
		}
	}
	// A glob character in the prefix matches literally.
	if err := raw.Set(ctx, "tXpolicy:glob.example", b, 0).Err(); err != nil {
		t.Fatal(err)
	}

	reader, _ := openTestRedis(t, s, "t:")
	got := map[string]*policycache.Entry{}
	if err := reader.Load(ctx, time.Now(), func(e *policycache.Entry) {
		if got[e.Domain] != nil {
			t.Errorf("Load: %s twice", e.Domain)
		}
		got[e.Domain] = e
	}); err != nil {
		t.Fatalf("Load: %v", err)
	}
	if len(got) != len(want) {
		t.Errorf("Load: %d entries, want %d", len(got), len(want))
	}
	for d, w := range want {
		if got[d] == nil {
			t.Fatalf("Load: %s missing", d)
		}
		sameRedisEntry(t, got[d], w)
	}
	for key, wantN := range map[string]int64{
		"t:policy:expired.example": 0, "t:policy:garbage.example": 0, "u:policy:foreign.example": 1,
	} {
		if n, err := raw.Exists(ctx, key).Result(); err != nil || n != wantN {
			t.Errorf("EXISTS %s = %d, %v; want %d", key, n, err, wantN)
		}
	}

	globbed, _ := openTestRedis(t, s, "t?")
	if err := globbed.Load(ctx, time.Now(), func(e *policycache.Entry) {
		t.Errorf("Load with prefix %q: got %s", "t?", e.Domain)
	}); err != nil {
		t.Fatalf("Load: %v", err)
	}
}

// within fails the test when f takes longer than d.
func within(t *testing.T, d time.Duration, what string, f func()) {
	t.Helper()
	start := time.Now()
	f()
	if took := time.Since(start); took > d {
		t.Errorf("%s took %v, want at most %v", what, took, d)
	}
}

func TestRedisOutage(t *testing.T) {
	s := startRedis(t)
	r, logs := openTestRedis(t, s, "t:")
	raw := s.raw()
	ctx := context.Background()

	gone := redisTestEntry("gone.example", time.Hour)
	if err := r.Put(ctx, gone); err != nil {
		t.Fatalf("Put: %v", err)
	}
	s.stop()

	unavailable := func(what string, err error) {
		t.Helper()
		if !errors.Is(err, policycache.ErrStoreUnavailable) {
			t.Errorf("%s while down: %v, want ErrStoreUnavailable", what, err)
		}
	}
	// The first call finds out; the following ones return at once.
	for range 2 {
		within(t, 1500*time.Millisecond, "Get", func() {
			e, err := r.Get(ctx, "example.com")
			if e != nil {
				t.Errorf("Get while down returned %v", e)
			}
			unavailable("Get", err)
		})
	}
	kept := redisTestEntry("kept.example", time.Hour)
	within(t, 1500*time.Millisecond, "Put", func() { unavailable("Put", r.Put(ctx, kept)) })
	within(t, 1500*time.Millisecond, "Delete", func() { unavailable("Delete", r.Delete(ctx, gone.Domain)) })
	within(t, 1500*time.Millisecond, "Claim", func() {
		ok, err := r.Claim(ctx, "example.com", time.Minute)
		if !ok {
			t.Error("Claim while down = false, want true (refresh it ourselves)")
		}
		unavailable("Claim", err)
	})
	within(t, 1500*time.Millisecond, "Load", func() {
		unavailable("Load", r.Load(ctx, time.Now(), func(*policycache.Entry) {}))
	})
	if r.Available() {
		t.Error("Available() = true while down")
	}

	s.start() // empty: no persistence, as after losing the server's data
	waitFor(t, 10*time.Second, "store available again", r.Available)
	got, err := r.Get(ctx, kept.Domain)
	if err != nil {
		t.Fatalf("Get after resume: %v", err)
	}
	sameRedisEntry(t, got, kept)
	if n, _ := raw.Exists(ctx, "t:policy:"+gone.Domain).Result(); n != 0 {
		t.Error("entry deleted while down is back")
	}

	out := logs.String()
	if n := strings.Count(out, "redis unreachable; answering from memory and live discovery"); n != 1 {
		t.Errorf("%d outage warnings, want 1:\n%s", n, out)
	}
	if n := strings.Count(out, "redis reachable again; sharing resumed"); n != 1 {
		t.Errorf("%d resume lines, want 1:\n%s", n, out)
	}
	if !strings.Contains(out, "written=2 dropped=0") {
		t.Errorf("resume line does not count 2 written and 0 dropped:\n%s", out)
	}
}

func TestRedisHungServer(t *testing.T) {
	s := startRedis(t)
	r, _ := openTestRedis(t, s, "t:")
	ctx := context.Background()
	if err := r.Put(ctx, redisTestEntry("example.com", time.Hour)); err != nil {
		t.Fatalf("Put: %v", err)
	}
	s.signal(syscall.SIGSTOP)
	within(t, 1500*time.Millisecond, "Get from a hung server", func() {
		if _, err := r.Get(ctx, "example.com"); !errors.Is(err, policycache.ErrStoreUnavailable) {
			t.Errorf("Get from a hung server: %v, want ErrStoreUnavailable", err)
		}
	})
	within(t, 100*time.Millisecond, "Claim with the breaker open", func() {
		if ok, err := r.Claim(ctx, "example.com", time.Minute); !ok || !errors.Is(err, policycache.ErrStoreUnavailable) {
			t.Errorf("Claim = %v, %v; want true, ErrStoreUnavailable", ok, err)
		}
	})
	s.signal(syscall.SIGCONT)
	waitFor(t, 10*time.Second, "store available again", r.Available)
	if e, err := r.Get(ctx, "example.com"); e == nil || err != nil {
		t.Errorf("Get after resume = %v, %v; want the entry", e, err)
	}
}

func TestRedisPendingBound(t *testing.T) {
	s := startRedis(t)
	r, logs := openTestRedis(t, s, "t:")
	ctx := context.Background()
	s.stop()
	if _, err := r.Get(ctx, "example.com"); !errors.Is(err, policycache.ErrStoreUnavailable) {
		t.Fatalf("Get while down: %v", err)
	}
	e := redisTestEntry("example.com", time.Hour)
	for i := range redisMaxPending + 5 {
		e := redisTestEntry(fmt.Sprintf("d%d.example", i), time.Hour)
		r.Put(ctx, e)
	}
	r.Put(ctx, e) // a domain over the bound: dropped
	s.start()
	waitFor(t, 10*time.Second, "store available again", r.Available)
	if !strings.Contains(logs.String(), fmt.Sprintf("written=%d dropped=6", redisMaxPending)) {
		t.Errorf("resume line does not count %d written and 6 dropped:\n%s", redisMaxPending, logs)
	}
	n, err := s.raw().DBSize(ctx).Result()
	if err != nil || n != redisMaxPending {
		t.Errorf("DBSIZE = %d, %v; want %d", n, err, redisMaxPending)
	}
}

func TestRedisStartsDown(t *testing.T) {
	s := startRedis(t)
	s.stop()
	r, _ := openTestRedis(t, s, "t:")
	within(t, 1500*time.Millisecond, "Load", func() {
		err := r.Load(context.Background(), time.Now(), func(*policycache.Entry) {})
		if !errors.Is(err, policycache.ErrStoreUnavailable) {
			t.Errorf("Load with the server down: %v, want ErrStoreUnavailable", err)
		}
	})
	if r.Available() {
		t.Error("Available() = true with the server down")
	}
	s.start()
	waitFor(t, 10*time.Second, "store available", r.Available)
	if err := r.Put(context.Background(), redisTestEntry("example.com", time.Hour)); err != nil {
		t.Errorf("Put after start: %v", err)
	}
}

func TestRedisOpenBadURL(t *testing.T) {
	for _, u := range []string{"", "http://localhost", "redis://user:s3cret@[::1/0", "redis://localhost/notadb"} {
		_, err := OpenRedis(RedisOptions{URL: u})
		if err == nil {
			t.Errorf("OpenRedis(%q): no error", u)
			continue
		}
		if !strings.Contains(err.Error(), "cache.redis_url") || strings.Contains(err.Error(), "s3cret") {
			t.Errorf("OpenRedis(%q) error %q: want it to name cache.redis_url and not the password", u, err)
		}
	}
}

func TestRedisCloseLeavesNoGoroutine(t *testing.T) {
	s := startRedis(t)
	before := runtime.NumGoroutine() // the server's Wait goroutine included
	r, err := OpenRedis(RedisOptions{URL: s.URL, Prefix: "t:", ProbeInterval: 50 * time.Millisecond})
	if err != nil {
		t.Fatal(err)
	}
	ctx := context.Background()
	if err := r.Put(ctx, redisTestEntry("example.com", time.Hour)); err != nil {
		t.Fatal(err)
	}
	s.stop() // so that the probe is running when Close is called
	r.Get(ctx, "example.com")
	if r.Available() {
		t.Fatal("store available with the server down")
	}
	if err := r.Close(); err != nil {
		t.Errorf("Close: %v", err)
	}
	s.start() // its Wait goroutine again, as counted in before
	waitFor(t, 5*time.Second, "goroutines back to the count before OpenRedis", func() bool {
		return runtime.NumGoroutine() <= before
	})
}

// SPEC 8.3: a record's key and its decode error are logged bounded.
func TestRedisLogsBounded(t *testing.T) {
	s := startRedis(t)
	r, logs := openTestRedis(t, s, "t:")
	ctx := context.Background()
	domain := strings.Repeat("a", 10000)
	val := `{"v":1,"domain":"` + strings.Repeat("b", 10000) + `","fetched":"` + strings.Repeat("x", 10000) + `"}`
	if err := s.raw().Set(ctx, "t:policy:"+domain, val, 0).Err(); err != nil {
		t.Fatal(err)
	}
	if got, err := r.Get(ctx, domain); got != nil || err != nil {
		t.Fatalf("Get = %v, %v; want nil, nil", got, err)
	}
	out := logs.String()
	if !strings.Contains(out, "dropping undecodable policy record") {
		t.Fatalf("no warning about the undecodable record:\n%.2000s", out)
	}
	for line := range strings.Lines(out) {
		if len(line) > 1024 {
			t.Errorf("log line of %d bytes, want at most 1024: %.300s...", len(line), line)
		}
	}
}
