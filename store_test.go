package main

import (
	"bufio"
	"bytes"
	"context"
	"crypto/x509"
	"fmt"
	"io"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"stsmap/config"
	"stsmap/internal/fixture"
	"stsmap/policycache"
	"stsmap/policystore"
	"stsmap/resolver"
	"stsmap/socketmap"
)

// Persistence and fleets, with stsmap as a real process that is killed and
// restarted. The process is this test binary in daemon mode (see
// runTestDaemon): the same serve() as the stsmap binary, with the policy
// fetcher's dial hook pointed at the fixture, so no root or port 443 is
// needed.

const (
	daemonConfigEnv  = "STSMAP_TEST_DAEMON_CONFIG"
	daemonDialEnv    = "STSMAP_TEST_DAEMON_DIAL"
	daemonCAEnv      = "STSMAP_TEST_DAEMON_CA"
	daemonRefreshEnv = "STSMAP_TEST_DAEMON_REFRESH"
)

// runTestDaemon serves the config named by the environment, reaching
// policy hosts at the fixture's address. A refresh interval below the
// config's minimum can be set for tests.
func runTestDaemon(cfgPath string) int {
	cfg, err := config.Load(cfgPath)
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		return exitUsage
	}
	if d := os.Getenv(daemonRefreshEnv); d != "" {
		cfg.Refresh.Interval, _ = time.ParseDuration(d)
	}
	pem, err := os.ReadFile(os.Getenv(daemonCAEnv))
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		return exitUsage
	}
	pool := x509.NewCertPool()
	pool.AppendCertsFromPEM(pem)
	addr := os.Getenv(daemonDialEnv)
	e := &env{stdout: os.Stdout, stderr: os.Stderr, rootCAs: pool,
		dial: func(ctx context.Context, network, _ string) (net.Conn, error) {
			var d net.Dialer
			return d.DialContext(ctx, network, addr)
		}}
	return serve(context.Background(), cfg, cfgPath, e)
}

// daemon is a running stsmap process serving on a unix socket.
type daemon struct {
	cmd  *exec.Cmd
	sock string
	mu   sync.Mutex
	log  bytes.Buffer
}

func (d *daemon) logs() string {
	d.mu.Lock()
	defer d.mu.Unlock()
	return d.log.String()
}

// startDaemon starts stsmap with a config of its own in dir and waits until
// it serves. extra is appended to the config file.
func startDaemon(t *testing.T, w *fixture.World, dir, extra string, env ...string) *daemon {
	t.Helper()
	d := &daemon{sock: filepath.Join(dir, "stsmap.sock")}
	cfgPath := filepath.Join(dir, "stsmap.yaml")
	body := fmt.Sprintf("listen: [\"unix:%s\"]\nmetrics:\n  listen: \"\"\nadmin:\n  socket: \"none\"\ndns:\n  nameservers: [%q]\n  timeout: 1s\n%s", d.sock, w.DNS.Addr, extra)
	if err := os.WriteFile(cfgPath, []byte(body), 0o644); err != nil {
		t.Fatal(err)
	}
	caFile := filepath.Join(dir, "ca.pem")
	if _, err := os.Stat(caFile); err != nil {
		w.CA.WriteCertFile(t, dir)
	}
	d.cmd = exec.Command(os.Args[0], "-test.run=^$")
	d.cmd.Env = append(os.Environ(), daemonConfigEnv+"="+cfgPath, daemonCAEnv+"="+caFile,
		daemonDialEnv+"="+w.Policy.Server.Listener.Addr().String())
	d.cmd.Env = append(d.cmd.Env, env...)
	stderr, _ := d.cmd.StderrPipe()
	if err := d.cmd.Start(); err != nil {
		t.Fatal(err)
	}
	ready := make(chan bool, 1)
	go func() {
		s := bufio.NewScanner(stderr)
		sent := false
		for s.Scan() {
			d.mu.Lock()
			d.log.WriteString(s.Text() + "\n")
			d.mu.Unlock()
			if !sent && strings.Contains(s.Text(), "stsmap serving") {
				ready <- true
				sent = true
			}
		}
		if !sent {
			ready <- false
		}
	}()
	t.Cleanup(func() { d.kill() })
	select {
	case ok := <-ready:
		if !ok {
			t.Fatalf("stsmap exited before serving:\n%s", d.logs())
		}
	case <-time.After(30 * time.Second):
		t.Fatalf("stsmap not serving after 30s:\n%s", d.logs())
	}
	return d
}

func (d *daemon) kill() {
	if d.cmd.ProcessState == nil {
		d.cmd.Process.Signal(syscall.SIGKILL)
		d.cmd.Wait()
	}
}

// ask sends one request on a fresh connection and returns the reply.
func (d *daemon) ask(t *testing.T, req string) string {
	t.Helper()
	c, err := net.Dial("unix", d.sock)
	if err != nil {
		t.Fatalf("connect to stsmap: %v\n%s", err, d.logs())
	}
	defer c.Close()
	return exchange(t, c, bufio.NewReader(c), req)
}

const exampleAnswer = "OK secure match=mx1.example.com:.example.net servername=hostname"

// A restart, for real: SIGKILL right after the policy is stored, then a restart with
// the domain's DNS and policy host gone, and the policy is still enforced.
func TestRestartKeepsPolicies(t *testing.T) {
	w := newTestWorld(t)
	dir := t.TempDir()
	storeCfg := fmt.Sprintf("cache:\n  store: bolt\n  path: %q\n", filepath.Join(dir, "policies.db"))
	d := startDaemon(t, w, dir, storeCfg+"log:\n  level: debug\n")
	if got := d.ask(t, "postfix example.com"); got != exampleAnswer {
		t.Fatalf("first answer: got %q, want %q\n%s", got, exampleAnswer, d.logs())
	}
	// The store write follows the answer by a moment.
	for deadline := time.Now().Add(10 * time.Second); !strings.Contains(d.logs(), `msg="policy stored" domain=example.com`); time.Sleep(10 * time.Millisecond) {
		if time.Now().After(deadline) {
			t.Fatalf("the policy was not stored within 10 s:\n%s", d.logs())
		}
	}
	d.kill()
	w.Stop()

	d2 := startDaemon(t, w, dir, storeCfg)
	if got := d2.ask(t, "postfix example.com"); got != exampleAnswer {
		t.Errorf("after SIGKILL and restart with the fixtures stopped: got %q, want %q\n%s", got, exampleAnswer, d2.logs())
	}
	if !strings.Contains(d2.logs(), "policies=1") {
		t.Errorf("restart log does not report the loaded policy:\n%s", d2.logs())
	}
}

// A damaged store is moved aside; stsmap starts with an empty cache instead
// of crash-looping.
func TestCorruptStoreIsMovedAside(t *testing.T) {
	w := newTestWorld(t)
	dir := t.TempDir()
	path := filepath.Join(dir, "policies.db")
	if err := os.WriteFile(path, bytes.Repeat([]byte("not a bbolt file "), 1000), 0o600); err != nil {
		t.Fatal(err)
	}
	d := startDaemon(t, w, dir, fmt.Sprintf("cache:\n  store: bolt\n  path: %q\n", path))
	if got := d.ask(t, "postfix example.com"); got != exampleAnswer {
		t.Errorf("answer with a fresh store: got %q, want %q", got, exampleAnswer)
	}
	moved, _ := filepath.Glob(path + ".corrupt-*")
	if len(moved) != 1 || !strings.Contains(d.logs(), "moved aside") {
		t.Errorf("damaged store: moved files %v; log:\n%s", moved, d.logs())
	}
}

// A fleet, for real: two stsmap processes share one Redis.
func TestFleetSharesThroughRedis(t *testing.T) {
	bin := requireTool(t, "redis-server", "redis-server")
	redis := fixture.StartRedis(t, bin, t.TempDir())
	w := newTestWorld(t)
	w.Publish(t, "fleet2.example", "1", "enforce", 86400, "mx.fleet2.example")
	storeCfg := fmt.Sprintf("cache:\n  store: redis\n  redis_url: %q\n", redis.URL)
	const interval = 2 * time.Second
	a := startDaemon(t, w, t.TempDir(), storeCfg, daemonRefreshEnv+"="+interval.String())
	b := startDaemon(t, w, t.TempDir(), storeCfg, daemonRefreshEnv+"="+interval.String())

	// What the first learned, the second answers from Redis, with no DNS
	// query or fetch of its own.
	if got := a.ask(t, "postfix example.com"); got != exampleAnswer {
		t.Fatalf("first MTA: got %q\n%s", got, a.logs())
	}
	// The store write follows the answer by a moment.
	if !fixture.Poll(10*time.Second, 10*time.Millisecond, func() bool { n, _ := redis.Keys("*policy:example.com"); return n > 0 }) {
		t.Fatalf("the first MTA's policy did not reach Redis within 10 s\n%s", a.logs())
	}
	txt, fetches := w.DNS.QueriesFor("_mta-sts.example.com"), w.Policy.Fetches()
	if got := b.ask(t, "postfix example.com"); got != exampleAnswer {
		t.Fatalf("second MTA: got %q\n%s", got, b.logs())
	}
	if w.DNS.QueriesFor("_mta-sts.example.com") != txt || w.Policy.Fetches() != fetches {
		t.Errorf("second MTA discovered the policy itself instead of reading it from Redis")
	}

	// One refresh per domain per interval across both MTAs.
	txt = w.DNS.QueriesFor("_mta-sts.example.com")
	const window = 10 * interval
	time.Sleep(window)
	refreshes := w.DNS.QueriesFor("_mta-sts.example.com") - txt
	t.Logf("TXT re-checks of example.com by two MTAs in %v with a %v interval: %d", window, interval, refreshes)
	if perMTA := int(window / interval); refreshes < perMTA/2 || refreshes > perMTA+perMTA/4 {
		t.Errorf("TXT re-checks of one domain by two MTAs in %v with a %v interval: got %d, want about %d (one per interval for the fleet)",
			window, interval, refreshes, perMTA)
	}
	if f := w.Policy.Fetches(); f != fetches {
		t.Errorf("refreshes with an unchanged id fetched the policy %d times", f-fetches)
	}

	// Redis goes away: both keep answering, from memory and live discovery.
	redis.Stop()
	for _, d := range []*daemon{a, b} {
		if got := d.ask(t, "postfix example.com"); got != exampleAnswer {
			t.Errorf("with Redis down: got %q\n%s", got, d.logs())
		}
	}
	if got := a.ask(t, "postfix fleet2.example"); got != "OK secure match=mx.fleet2.example servername=hostname" {
		t.Errorf("live discovery with Redis down: got %q\n%s", got, a.logs())
	}

	// Redis returns (empty): sharing resumes, and what was learned
	// meanwhile reaches the other MTA.
	redis.Start(t)
	deadline := time.Now().Add(20 * time.Second)
	for {
		n, err := redis.Keys("stsmap:policy:fleet2.example")
		if err == nil && n == 1 {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("fleet2.example never reached Redis after it returned (keys %d, %v)\n%s", n, err, a.logs())
		}
		time.Sleep(100 * time.Millisecond)
	}
	// The second MTA shares again once its own probe found Redis back (if
	// it touched Redis during the outage at all).
	for strings.Contains(b.logs(), "redis unreachable") && !strings.Contains(b.logs(), "sharing resumed") {
		if time.Now().After(deadline) {
			t.Fatalf("second MTA never resumed sharing:\n%s", b.logs())
		}
		time.Sleep(100 * time.Millisecond)
	}
	q := w.DNS.QueriesFor("_mta-sts.fleet2.example")
	if got := b.ask(t, "postfix fleet2.example"); got != "OK secure match=mx.fleet2.example servername=hostname" {
		t.Errorf("second MTA after Redis returned: got %q\n%s", got, b.logs())
	}
	if w.DNS.QueriesFor("_mta-sts.fleet2.example") != q {
		t.Errorf("second MTA discovered fleet2.example itself; want it from Redis")
	}
	// The MTA that wrote during the outage logged it once, and its return.
	if l := a.logs(); strings.Count(l, "redis unreachable") != 1 || !strings.Contains(l, "sharing resumed") {
		t.Errorf("first MTA's log does not report the outage once and its end:\n%s", l)
	}
}

// BenchmarkStartup100k measures start-up to first answer with 100,000
// stored policies: open the bbolt store, listen, answer a stored domain
// (read from the store while it loads in the background). It reports the
// store's size on disk.
//
//	go test -run '^$' -bench Startup100k -benchtime 5x .
func BenchmarkStartup100k(b *testing.B) {
	const n = 100000
	cfg, sock := storedConfig(b, n)
	st, err := os.Stat(cfg.Cache.Path)
	if err != nil {
		b.Fatal(err)
	}
	for b.Loop() {
		stop := startStored(b, cfg, io.Discard)
		askStored(b, sock)
		b.StopTimer()
		stop()
		b.StartTimer()
	}
	b.ReportMetric(float64(st.Size()), "store_bytes")
}

// BenchmarkHeapPerPolicy100k measures the daemon's heap with 100,000
// stored policies loaded into the cache (issue 7: at most 1.5 KiB per
// cached policy): the heap in use after the first answer, less the heap
// before serve started, divided by the number of policies.
func BenchmarkHeapPerPolicy100k(b *testing.B) {
	const n = 100000
	cfg, sock := storedConfig(b, n)
	var perPolicy float64
	for b.Loop() {
		before := heapInUse()
		logs := &fixture.SyncBuffer{}
		stop := startStored(b, cfg, logs)
		for !strings.Contains(logs.String(), "policy store loaded") { // loaded in the background
			time.Sleep(10 * time.Millisecond)
		}
		if !strings.Contains(logs.String(), fmt.Sprintf("policies=%d", n)) {
			b.Fatalf("the store did not load %d policies:\n%s", n, logs)
		}
		askStored(b, sock)
		perPolicy = float64(heapInUse()-before) / n
		stop()
	}
	b.ReportMetric(perPolicy, "heap_bytes/policy")
}

// BenchmarkHeapPerDomainAsked100k is BenchmarkHeapPerPolicy100k once
// Postfix has asked for every domain, twice: the heap then also holds each
// domain's rendered answer and its reply kept ready (policymap's hot
// table). DANE is off: its cache is a cost of its own.
func BenchmarkHeapPerDomainAsked100k(b *testing.B) {
	const n = 100000
	cfg, sock := storedConfig(b, n)
	cfg.DANE = "off"
	var perDomain float64
	for b.Loop() {
		before := heapInUse()
		logs := &fixture.SyncBuffer{}
		stop := startStored(b, cfg, logs)
		for !strings.Contains(logs.String(), "policy store loaded") {
			time.Sleep(10 * time.Millisecond)
		}
		c, err := net.Dial("unix", sock)
		if err != nil {
			b.Fatal(err)
		}
		dec := socketmap.NewDecoder(bufio.NewReader(c), 1<<20)
		for range 2 {
			for i := range n {
				io.WriteString(c, netstring(fmt.Sprintf("postfix d%d.example", i)))
				if reply, err := dec.Next(); err != nil || !bytes.HasPrefix(reply, []byte("OK secure")) {
					b.Fatalf("d%d.example: %q, %v", i, reply, err)
				}
			}
		}
		c.Close()
		perDomain = float64(heapInUse()-before) / n
		stop()
	}
	b.ReportMetric(perDomain, "heap_bytes/domain")
}

// storedConfig is the embedded defaults on a bbolt store of n policies
// (d0.example ...), listening on a unix socket, with no metrics or admin
// listener and a nameserver that is never asked.
func storedConfig(b *testing.B, n int) (cfg *config.Config, sock string) {
	dir := b.TempDir()
	cfg = config.Default()
	cfg.Cache.Path = filepath.Join(dir, "policies.db")
	fillStore(b, cfg.Cache.Path, n)
	cfg.Metrics.Listen = ""
	cfg.Admin.Socket = "none"
	cfg.DNS.Nameservers = []string{"127.0.0.1:9"} // never asked: every answer is stored
	sock = filepath.Join(dir, "s.sock")
	cfg.Listen = []string{"unix:" + sock}
	return cfg, sock
}

// startStored runs serve on cfg until its listeners are up; stop ends it.
func startStored(b *testing.B, cfg *config.Config, stderr io.Writer) (stop func()) {
	ctx, cancel := context.WithCancel(context.Background())
	ready := make(chan []net.Addr, 1)
	done := make(chan int, 1)
	e := &env{stdout: io.Discard, stderr: stderr, ready: func(a []net.Addr) { ready <- a }}
	go func() { done <- serve(ctx, cfg, "", e) }()
	<-ready
	return func() { cancel(); <-done }
}

// askStored asks for a stored domain and checks the answer.
func askStored(b *testing.B, sock string) {
	c, err := net.Dial("unix", sock)
	if err != nil {
		b.Fatal(err)
	}
	defer c.Close()
	reply := make([]byte, 200)
	io.WriteString(c, netstring("postfix d4242.example"))
	k, _ := c.Read(reply)
	if !strings.Contains(string(reply[:k]), "OK secure") {
		b.Fatalf("first answer: %q", reply[:k])
	}
}

// heapInUse is the live heap after a full collection.
func heapInUse() int64 {
	runtime.GC()
	var ms runtime.MemStats
	runtime.ReadMemStats(&ms)
	return int64(ms.HeapAlloc)
}

// fillStore writes n enforce policies d0.example ... into a bbolt file.
func fillStore(tb testing.TB, path string, n int) {
	tb.Helper()
	store, err := policystore.OpenBolt(path, nil)
	if err != nil {
		tb.Fatal(err)
	}
	defer store.Close()
	now := time.Now()
	var wg sync.WaitGroup
	work := make(chan int)
	for range 500 {
		wg.Go(func() {
			for i := range work {
				// A policy as fetched: parsed from a typical body, so that
				// its lines (kept for TLSRPT) are stored too.
				body := fmt.Sprintf("version: STSv1\r\nmode: enforce\r\nmx: mx1.d%d.example\r\nmx: *.mail.example.net\r\nmax_age: 604800\r\n", i)
				p, err := resolver.ParsePolicy([]byte(body))
				if err != nil {
					tb.Error(err)
					continue
				}
				e := &policycache.Entry{Domain: fmt.Sprintf("d%d.example", i), ID: "20260101", Reason: policycache.ReasonPolicy,
					Policy: p, Fetched: now, Checked: now, Expires: now.Add(p.MaxAge)}
				if err := store.Put(context.Background(), e); err != nil {
					tb.Error(err)
				}
			}
		})
	}
	for i := range n {
		work <- i
	}
	close(work)
	wg.Wait()
}
