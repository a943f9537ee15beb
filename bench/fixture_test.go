package main

import (
	"bufio"
	"bytes"
	"context"
	"errors"
	"log/slog"
	"maps"
	"net"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"stsmap/policymap"
	"stsmap/resolver"
	"stsmap/socketmap"
)

// startTestFixture serves n synthetic domains on free loopback ports
// until the test ends.
func startTestFixture(t *testing.T, n int) *benchFixture {
	t.Helper()
	fx, err := startFixture(fixtureOptions{domains: n, dnsAddr: "127.0.0.1:0", httpsAddr: "127.0.0.1:0", pregen: true})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(fx.Close)
	return fx
}

func httpsPort(t *testing.T, fx *benchFixture) int {
	t.Helper()
	_, port, err := net.SplitHostPort(fx.HTTPSAddr)
	if err != nil {
		t.Fatal(err)
	}
	p, _ := strconv.Atoi(port)
	return p
}

// TestFixtureServesPolicy discovers a synthetic domain the way stsmap
// does, with package resolver, and checks the answer Postfix would get.
func TestFixtureServesPolicy(t *testing.T) {
	fx := startTestFixture(t, 20)
	if got, want := len(fx.Domains), 20; got != want {
		t.Fatalf("%d domains, want %d", got, want)
	}
	if fx.Domains[0] != "d000001.bench.test" || fx.Domains[19] != "d000020.bench.test" {
		t.Fatalf("domains %q ... %q", fx.Domains[0], fx.Domains[19])
	}
	dns := resolver.NewDNS([]string{fx.DNS.Addr}, 2*time.Second)
	r := &resolver.Resolver{DNS: dns, Fetcher: &resolver.Fetcher{Hosts: dns, RootCAs: fx.CA.Pool, DialContext: fx.Policy.Dial}}
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()

	d := fx.Domains[6]
	rec, err := r.LookupRecord(ctx, d)
	if err != nil || rec.ID != benchPolicyID {
		t.Fatalf("LookupRecord(%s) = %+v, %v; want id %s", d, rec, err, benchPolicyID)
	}
	addrs, err := dns.LookupHost(ctx, "mta-sts."+d)
	if err != nil || len(addrs) == 0 || addrs[0].String() != "127.0.0.1" {
		t.Fatalf("LookupHost(mta-sts.%s) = %v, %v; want 127.0.0.1 first", d, addrs, err)
	}
	for _, a := range addrs {
		if a.Unmap().String() != "127.0.0.1" {
			t.Errorf("policy host address %v does not reach the policy server", a)
		}
	}
	p, err := r.FetchPolicy(ctx, d)
	if err != nil {
		t.Fatalf("FetchPolicy(%s): %v", d, err)
	}
	if p.Mode != resolver.ModeEnforce || !slices.Equal(p.MX, benchMX(d)) {
		t.Errorf("policy of %s: mode %s mx %q; want enforce %q", d, p.Mode, p.MX, benchMX(d))
	}
	if got, ok := policymap.Answer(d, p, policymap.Settings{Servername: true}); !ok || got != benchAnswer(d) {
		t.Errorf("answer for %s: %q, %v; want %q", d, got, ok, benchAnswer(d))
	}
	// The MX record stsmap's DANE check asks for.
	if mx, _, err := dns.LookupMX(ctx, d); err != nil || !slices.Equal(mx, []string{"mx1." + d}) {
		t.Errorf("LookupMX(%s) = %q, %v", d, mx, err)
	}

	// A domain past the last one is not published.
	if _, err := r.LookupRecord(ctx, benchDomain(21)); !errors.Is(err, resolver.ErrNoRecord) {
		t.Errorf("LookupRecord(%s): %v, want ErrNoRecord", benchDomain(21), err)
	}
}

func TestFixtureFiles(t *testing.T) {
	fx := startTestFixture(t, 25)
	dir := t.TempDir()
	if err := fx.writeFiles(dir); err != nil {
		t.Fatal(err)
	}
	read := func(name string) []string {
		t.Helper()
		keys, err := readKeys(filepath.Join(dir, name))
		if err != nil {
			t.Fatal(err)
		}
		return keys
	}
	if got := read(keysHitFile); !slices.Equal(got, fx.Domains) {
		t.Errorf("%s: %d keys %q..., want the %d domains", keysHitFile, len(got), got[:2], len(fx.Domains))
	}
	// stsmap answers parent and IP-literal keys NOTFOUND with no lookup
	// (SPEC 2.4); each file holds only keys of its kind.
	for name, want := range map[string]string{keysParentFile: "parent_domain", keysIPFile: "ip_literal"} {
		keys := read(name)
		if len(keys) < len(fx.Domains) {
			t.Errorf("%s: %d keys, want at least %d", name, len(keys), len(fx.Domains))
		}
		for _, k := range keys {
			if _, err := policymap.ParseKey(k); policymap.SkipReason(err) != want {
				t.Errorf("%s: key %q: %v, want %s", name, k, err, want)
			}
		}
	}
	parents := read(keysParentFile)
	for _, want := range []string{"." + fx.Domains[0], ".bench.test", ".test"} {
		if !slices.Contains(parents, want) {
			t.Errorf("%s lacks %q", keysParentFile, want)
		}
	}
	ips := read(keysIPFile)
	for _, want := range []string{"[192.0.2.1]", "[ipv6:2001:db8::0:2]", "198.51.100.3", "[203.0.113.4]:25", "2001:db8::0:5"} {
		if !slices.Contains(ips, want) {
			t.Errorf("%s lacks %q", keysIPFile, want)
		}
	}
	pem, err := os.ReadFile(filepath.Join(dir, caFile))
	if err != nil || !bytes.Contains(pem, []byte("BEGIN CERTIFICATE")) {
		t.Errorf("%s: %v", caFile, err)
	}
}

// TestRunFixture runs -fixture as a process would, until its context ends.
func TestRunFixture(t *testing.T) {
	dir := t.TempDir()
	ctx, cancel := context.WithCancel(context.Background())
	stdoutR, stdoutW, err := os.Pipe()
	if err != nil {
		t.Fatal(err)
	}
	defer stdoutR.Close()
	var stderr syncBuffer
	done := make(chan int, 1)
	go func() {
		defer stdoutW.Close()
		done <- runFixture(ctx, fixtureOptions{domains: 10, dnsAddr: "127.0.0.1:0", httpsAddr: "127.0.0.1:0", dir: dir, pregen: true}, stdoutW, &stderr)
	}()
	line, err := bufio.NewReader(stdoutR).ReadString('\n')
	if line != "ready\n" {
		cancel()
		t.Fatalf("first line %q (%v), want ready; stderr %s", line, err, stderr.String())
	}
	for _, name := range []string{caFile, keysHitFile, keysParentFile, keysIPFile} {
		if _, err := os.Stat(filepath.Join(dir, name)); err != nil {
			t.Errorf("after ready: %v", err)
		}
	}
	if !strings.Contains(stderr.String(), "10 domains d000001.bench.test to d000010.bench.test") {
		t.Errorf("stderr: %s", stderr.String())
	}
	cancel()
	if code := <-done; code != 0 {
		t.Errorf("exit %d: %s", code, stderr.String())
	}

	// A taken port fails with the fixture's error, not a panic.
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	_, err = startFixture(fixtureOptions{domains: 1, dnsAddr: "127.0.0.1:0", httpsAddr: ln.Addr().String()})
	if err == nil || !strings.Contains(err.Error(), "policy server") {
		t.Errorf("fixture on a taken port: %v", err)
	}
}

type syncBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (s *syncBuffer) Write(p []byte) (int, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.Write(p)
}

func (s *syncBuffer) String() string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.String()
}

// fakeMap is a socketmap server that records the keys it is asked.
type fakeMap struct {
	addr string
	mu   sync.Mutex
	seen map[string]int
}

// startFakeMap serves answer on a free loopback port until the test ends.
func startFakeMap(t *testing.T, answer func(key string) socketmap.Reply) *fakeMap {
	t.Helper()
	fm := &fakeMap{seen: map[string]int{}}
	srv := &socketmap.Server{
		Logger: slog.New(slog.DiscardHandler),
		Handler: socketmap.HandlerFunc(func(_ context.Context, _, key string) socketmap.Reply {
			fm.mu.Lock()
			fm.seen[key]++
			fm.mu.Unlock()
			return answer(key)
		}),
	}
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	fm.addr = ln.Addr().String()
	done := make(chan struct{})
	go func() { srv.Serve(ln); close(done) }()
	t.Cleanup(func() { srv.Close(); <-done })
	return fm
}

func (fm *fakeMap) keys() map[string]int {
	fm.mu.Lock()
	defer fm.mu.Unlock()
	return maps.Clone(fm.seen)
}

// byPrefix answers OK for keys starting "ok", TEMP for "tmp", else
// NOTFOUND.
func byPrefix(key string) socketmap.Reply {
	switch {
	case strings.HasPrefix(key, "ok"):
		return socketmap.OK("secure")
	case strings.HasPrefix(key, "tmp"):
		return socketmap.Temp("x")
	}
	return socketmap.NotFound()
}

func writeKeys(t *testing.T, keys []string) string {
	t.Helper()
	path := filepath.Join(t.TempDir(), "keys")
	if err := os.WriteFile(path, []byte(strings.Join(keys, "\n")+"\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	return path
}

func TestWarm(t *testing.T) {
	fm := startFakeMap(t, byPrefix)
	var keys []string
	for i := range 85 {
		switch {
		case i < 50:
			keys = append(keys, "ok"+strconv.Itoa(i)+".example")
		case i < 80:
			keys = append(keys, "nf"+strconv.Itoa(i)+".example")
		default:
			keys = append(keys, "tmp"+strconv.Itoa(i)+".example")
		}
	}
	cfg := config{addr: fm.addr, conns: 4, timeout: 5 * time.Second, maxErrShow: maxErrorsShown,
		pool: makePool("postfix", keys, nil)}
	res := runWarm(cfg)
	if res.Keys != 85 || res.Answered != 85 || res.Errors != 0 {
		t.Errorf("keys %d answered %d errors %d %q; want 85 85 0", res.Keys, res.Answered, res.Errors, res.FirstErrs)
	}
	if want := map[string]int64{"OK": 50, "NOTFOUND": 30, "TEMP": 5, "TIMEOUT": 0, "PERM": 0}; !maps.Equal(res.Replies, want) {
		t.Errorf("replies %v, want %v", res.Replies, want)
	}
	// Every key exactly once.
	seen := fm.keys()
	for _, k := range keys {
		if seen[k] != 1 {
			t.Errorf("key %s asked %d times, want once", k, seen[k])
		}
	}
	if len(seen) != len(keys) {
		t.Errorf("%d distinct keys asked, want %d", len(seen), len(keys))
	}

	// With -expect OK the others are errors, and the exit status says so.
	path := writeKeys(t, keys)
	var out, errOut bytes.Buffer
	code := run([]string{"-warm", "-addr", fm.addr, "-keys", path, "-c", "3", "-expect", "OK"}, &out, &errOut)
	if code != 1 || !strings.Contains(out.String(), "errors       35\n") || !strings.Contains(out.String(), "replies      OK 50  NOTFOUND 30  TEMP 5\n") {
		t.Errorf("-warm -expect OK: exit %d, want 1:\n%s%s", code, out.String(), errOut.String())
	}
	out.Reset()
	code = run([]string{"-warm", "-addr", fm.addr, "-keys", path, "-c", "3", "-json"}, &out, &errOut)
	if code != 0 || !strings.Contains(out.String(), `"answered": 85`) {
		t.Errorf("-warm -json: exit %d:\n%s%s", code, out.String(), errOut.String())
	}

	// A server that is not there: nothing answered, a failure.
	ln, _ := net.Listen("tcp", "127.0.0.1:0")
	dead := ln.Addr().String()
	ln.Close()
	res = runWarm(config{addr: dead, conns: 2, timeout: time.Second, maxErrShow: maxErrorsShown, pool: makePool("postfix", keys, nil)})
	if res.Answered != 0 || res.Errors != 2 {
		t.Errorf("no server: answered %d errors %d", res.Answered, res.Errors)
	}
}

// TestExpectWord checks -expect for a load run from a key file. One
// connection cycles through the keys in order, so the counts are exact.
func TestExpectWord(t *testing.T) {
	fm := startFakeMap(t, byPrefix)
	path := writeKeys(t, []string{"ok1.example", "ok2.example", "nf.example"})
	var out, errOut bytes.Buffer
	if code := run([]string{"-addr", fm.addr, "-keys", path, "-n", "300", "-c", "1", "-expect", "OK"}, &out, &errOut); code != 1 ||
		!strings.Contains(out.String(), "errors       100\n") || !strings.Contains(out.String(), "want OK") {
		t.Errorf("-expect OK: exit %d:\n%s%s", code, out.String(), errOut.String())
	}
	out.Reset()
	if code := run([]string{"-addr", fm.addr, "-keys", path, "-n", "300", "-c", "1", "-expect", "NOTFOUND"}, &out, &errOut); code != 1 ||
		!strings.Contains(out.String(), "errors       200\n") {
		t.Errorf("-expect NOTFOUND: exit %d:\n%s%s", code, out.String(), errOut.String())
	}
	for _, args := range [][]string{{"-expect", "TEMP", "-keys", path}, {"-expect", "OK"}} {
		if code := run(append([]string{"-addr", fm.addr}, args...), &out, &errOut); code != 2 {
			t.Errorf("%q: exit %d, want 2", args, code)
		}
	}
}

func TestBareRoundTrip(t *testing.T) {
	fx := startTestFixture(t, 5)
	cfg := coldConfig{dnsAddr: fx.DNS.Addr, httpsPort: httpsPort(t, fx), roots: fx.CA.Pool, timeout: 5 * time.Second}
	ctx := context.Background()
	s, err := bareRoundTrip(ctx, cfg, fx.Domains[3])
	if err != nil {
		t.Fatal(err)
	}
	if s.TXT <= 0 || s.A <= 0 || s.TLS <= 0 || s.HTTP <= 0 {
		t.Errorf("steps %+v: all must be positive", s)
	}
	if got := fx.Policy.Fetches(); got != 1 {
		t.Errorf("%d policy fetches, want 1", got)
	}
	for name, q := range map[string]int{"_mta-sts." + fx.Domains[3]: 1, "mta-sts." + fx.Domains[3]: 1, fx.Domains[3]: 0} {
		if got := fx.DNS.QueriesFor(name); got != q {
			t.Errorf("%d queries for %s, want %d", got, name, q)
		}
	}
	// As stsmap: MX beside TXT, AAAA beside A.
	as := cfg
	as.bareAsStsmap = true
	if _, err := bareRoundTrip(ctx, as, fx.Domains[2]); err != nil {
		t.Fatal(err)
	}
	for name, q := range map[string]int{"_mta-sts." + fx.Domains[2]: 1, "mta-sts." + fx.Domains[2]: 2, fx.Domains[2]: 1} {
		if got := fx.DNS.QueriesFor(name); got != q {
			t.Errorf("-bare-as-stsmap: %d queries for %s, want %d", got, name, q)
		}
	}

	bad := map[string]func(*coldConfig) string{
		"unpublished domain": func(*coldConfig) string { return benchDomain(6) },
		"untrusted CA":       func(c *coldConfig) string { c.roots = nil; return fx.Domains[0] },
		"closed port": func(c *coldConfig) string {
			ln, _ := net.Listen("tcp", "127.0.0.1:0")
			c.httpsPort = ln.Addr().(*net.TCPAddr).Port
			ln.Close()
			return fx.Domains[0]
		},
	}
	for name, f := range bad {
		c := cfg
		d := f(&c)
		if _, err := bareRoundTrip(ctx, c, d); err == nil {
			t.Errorf("%s: no error", name)
		}
	}
}

// TestCold runs -cold against the fixture and a fake socketmap server:
// stsmap's keys and the bare ones are disjoint, and replies are checked.
func TestCold(t *testing.T) {
	fx := startTestFixture(t, 12)
	dir := t.TempDir()
	if err := fx.writeFiles(dir); err != nil {
		t.Fatal(err)
	}
	fm := startFakeMap(t, func(key string) socketmap.Reply { return socketmap.OK(benchAnswer(key)) })
	keys := filepath.Join(dir, keysHitFile)
	args := []string{"-cold", "-addr", fm.addr, "-keys", keys, "-dns", fx.DNS.Addr,
		"-https-port", strconv.Itoa(httpsPort(t, fx)), "-ca", filepath.Join(dir, caFile)}
	var out, errOut bytes.Buffer
	if code := run(append(args, "-n", "5"), &out, &errOut); code != 0 {
		t.Fatalf("exit %d:\n%s%s", code, out.String(), errOut.String())
	}
	for _, want := range []string{"cold         5 pairs", "stsmap       n 5 ", "bare         n 5 ", "replies    OK 5  NOTFOUND 0\n", "ratio        stsmap/bare  p50 ", "errors       0\n"} {
		if !strings.Contains(out.String(), want) {
			t.Errorf("output lacks %q:\n%s", want, out.String())
		}
	}
	seen := fm.keys()
	for i, d := range fx.Domains[:10] {
		asked := seen[d]
		fetched := fx.DNS.QueriesFor("_mta-sts." + d)
		if i%2 == 0 && (asked != 1 || fetched != 0) || i%2 == 1 && (asked != 0 || fetched != 1) {
			t.Errorf("%s: asked of stsmap %d times, TXT queried %d times", d, asked, fetched)
		}
	}
	if got := fx.Policy.Fetches(); got != 5 {
		t.Errorf("%d policy fetches, want 5", got)
	}

	// stsmap's replies are checked: NOTFOUND is an error by default.
	nf := startFakeMap(t, func(string) socketmap.Reply { return socketmap.NotFound() })
	out.Reset()
	if code := run(append(slices.Clone(args), "-n", "1", "-addr", nf.addr), &out, &errOut); code != 1 || !strings.Contains(out.String(), "want OK") {
		t.Errorf("NOTFOUND replies: exit %d, want 1:\n%s", code, out.String())
	}
	// JSON, and without -n every key pair.
	out.Reset()
	if code := run(append(slices.Clone(args), "-json", "-addr", nf.addr, "-expect", "NOTFOUND"), &out, &errOut); code != 0 || !strings.Contains(out.String(), `"pairs": 6`) {
		t.Errorf("-json: exit %d:\n%s%s", code, out.String(), errOut.String())
	}
	// More pairs than fresh keys.
	if code := run(append(slices.Clone(args), "-n", "7"), &out, &errOut); code != 2 {
		t.Errorf("-n 7 with 12 keys: exit %d, want 2", code)
	}
}
