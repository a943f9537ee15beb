// Command bench is a load tool for socketmap servers such as stsmap.
//
// As a client it opens -c connections to -addr, sends "<map> <key>" lookups
// as netstrings (-pipeline requests in flight per connection, 1 = wait for
// each reply as Postfix does), checks that every reply is a well-formed
// netstring with a valid reply word (and, with -expect-prefix, the word
// expected for the key class; with -keys, -expect OK or -expect NOTFOUND
// for every key), and reports throughput, latency percentiles and, with
// -pid, the server's CPU time per request.
//
// With -floor it is instead a minimal responder that answers every request
// with a fixed reply, to measure the protocol floor.
//
//	go run ./bench -floor -addr 127.0.0.1:18461 &
//	go run ./bench -addr 127.0.0.1:18461 -c 8 -n 200000 -pid PID
//
// Three more modes measure stsmap against local fixtures (issue 7), inside
// a network namespace whose 127.0.0.1:53 and :443 the fixture owns (see
// BENCHMARKS.md):
//
//   - -fixture serves -domains synthetic domains (d000001.bench.test and
//     on, each with an enforce policy) from the DNS and HTTPS fixtures of
//     internal/fixture on -dns and -https, writes ca.pem and the key files
//     keys-hit.txt, keys-parent.txt and keys-ip.txt into -dir, prints
//     "ready" and serves until SIGINT or SIGTERM.
//   - -warm sends every key of -keys once (-c at a time) and counts the
//     replies: the first contact that fills stsmap's cache.
//   - -cold times, one at a time, stsmap's first-contact lookups of half
//     the -keys against this tool's own bare round trips (DNS TXT, DNS A,
//     TCP and TLS to -https-port, HTTP GET) for the other half.
package main

import (
	"bufio"
	"cmp"
	"context"
	"crypto/x509"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"math"
	"math/rand/v2"
	"net"
	"os"
	"os/signal"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"stsmap/socketmap"
)

// clkTck is sysconf(_SC_CLK_TCK), 100 on Linux for every architecture Go
// supports.
const clkTck = 100

// maxReply bounds a reply netstring the client (or a request the floor
// responder) accepts.
const maxReply = 100_000

// maxErrorsShown is how many error messages are printed.
const maxErrorsShown = 5

// Key classes of generated keys; classAny is a key from a file, for which
// only well-formedness is checked.
const (
	classAny = iota
	classHit
	classParent
	classMiss
	// classNotFound is a key from a file run with -expect NOTFOUND.
	classNotFound
)

type request struct {
	wire  []byte // "<map> <key>" as a netstring
	class int
}

type config struct {
	addr       string
	conns      int
	total      int64         // requests; 0 with duration
	duration   time.Duration // 0 with total
	pipeline   int
	mapName    string
	expect     bool
	timeout    time.Duration
	pool       []request
	maxErrShow int
}

// result is what a run measured (the client side).
type result struct {
	Requests   int64         `json:"requests"`
	Errors     int64         `json:"errors"`
	Duration   time.Duration `json:"-"`
	DurationS  float64       `json:"duration_s"`
	RPS        float64       `json:"requests_per_s"`
	P50        time.Duration `json:"-"`
	P90        time.Duration `json:"-"`
	P99        time.Duration `json:"-"`
	P999       time.Duration `json:"-"`
	Max        time.Duration `json:"-"`
	LatencyUs  latencyJSON   `json:"latency_us"`
	ServerCPU  *float64      `json:"server_cpu_s,omitempty"`
	ServerUsRq *float64      `json:"server_cpu_us_per_request,omitempty"`
	ClientCPU  *float64      `json:"client_cpu_s,omitempty"`
	ClientUsRq *float64      `json:"client_cpu_us_per_request,omitempty"`
	FirstErrs  []string      `json:"first_errors,omitempty"`
	Conns      int           `json:"connections"`
	Pipeline   int           `json:"pipeline"`
}

type latencyJSON struct {
	P50  float64 `json:"p50"`
	P90  float64 `json:"p90"`
	P99  float64 `json:"p99"`
	P999 float64 `json:"p99_9"`
	Max  float64 `json:"max"`
}

func main() {
	os.Exit(run(os.Args[1:], os.Stdout, os.Stderr))
}

func run(args []string, stdout, stderr io.Writer) int {
	fs := flag.NewFlagSet("bench", flag.ContinueOnError)
	fs.SetOutput(stderr)
	addr := fs.String("addr", "127.0.0.1:8461", "server `host:port` or unix:/path")
	conns := fs.Int("c", 8, "concurrent connections")
	n := fs.Int64("n", 100000, "total requests (ignored with -d)")
	dur := fs.Duration("d", 0, "run for this long instead of -n requests")
	pipeline := fs.Int("pipeline", 1, "requests in flight per connection (1 = wait for each reply)")
	keysFile := fs.String("keys", "", "file of keys, one per line (instead of -gen)")
	gen := fs.String("gen", "hits=80,parent=10,miss=10", "generated key mix (percent weights)")
	domains := fs.Int("domains", 1000, "number of distinct hit domains d<i>.example for -gen, or of synthetic domains for -fixture")
	poolSize := fs.Int("pool", 1<<16, "number of pre-generated requests cycled through with -gen")
	seed := fs.Uint64("seed", 1, "random seed for -gen")
	mapName := fs.String("map", "postfix", "socketmap name sent with each key")
	expect := fs.Bool("expect-prefix", false, "check replies per key class: hits \"OK \", parent/miss \"NOTFOUND \"")
	expectWord := fs.String("expect", "", "with -keys: the reply `word` (OK or NOTFOUND) every key must get; -cold's default is OK")
	pid := fs.Int("pid", 0, "`PID` of the server, to report its CPU time")
	timeout := fs.Duration("timeout", 10*time.Second, "I/O timeout per connection")
	jsonOut := fs.Bool("json", false, "print the result as JSON")
	floor := fs.Bool("floor", false, "run a fixed-reply netstring responder on -addr instead of a client")
	floorReply := fs.String("floor-reply", "OK secure match=mx.example.com servername=hostname", "reply payload of -floor")
	fixtureMode := fs.Bool("fixture", false, "serve -domains synthetic domains over DNS on -dns and HTTPS on -https until killed")
	dir := fs.String("dir", ".", "-fixture: `directory` for ca.pem and the key files")
	dnsAddr := fs.String("dns", "127.0.0.1:53", "-fixture: DNS listen address; -cold: the DNS server of the bare round trips")
	httpsAddr := fs.String("https", "127.0.0.1:443", "-fixture: HTTPS listen address of the policy hosts")
	pregen := fs.Bool("pregen", true, "-fixture: issue every policy host's certificate before ready")
	warm := fs.Bool("warm", false, "send every -keys key once, -c at a time, and count the replies")
	cold := fs.Bool("cold", false, "time stsmap's first-contact lookups against bare DNS+TLS+HTTP round trips, one at a time (-n pairs from -keys)")
	httpsPort := fs.Int("https-port", 443, "-cold: port of the policy hosts for the bare round trips")
	bareAsStsmap := fs.Bool("bare-as-stsmap", false, "-cold: the bare round trips ask the DNS questions stsmap asks, two at a time (TXT with MX, A with AAAA)")
	caPath := fs.String("ca", "", "-cold: `PEM file` of the CA the policy hosts' certificates chain to (default: the system roots)")
	if err := fs.Parse(args); err != nil {
		return 2
	}
	if fs.NArg() > 0 {
		fmt.Fprintf(stderr, "bench: unexpected arguments %q\n", fs.Args())
		return 2
	}

	var nSet bool
	fs.Visit(func(f *flag.Flag) { nSet = nSet || f.Name == "n" })
	if *expectWord != "" && *expectWord != string(socketmap.WordOK) && *expectWord != string(socketmap.WordNotFound) {
		fmt.Fprintf(stderr, "bench: -expect %q: want OK or NOTFOUND\n", *expectWord)
		return 2
	}
	if *expectWord != "" && *keysFile == "" {
		fmt.Fprintln(stderr, "bench: -expect needs -keys (generated keys use -expect-prefix)")
		return 2
	}

	switch {
	case *fixtureMode:
		ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
		defer stop()
		return runFixture(ctx, fixtureOptions{domains: *domains, dnsAddr: *dnsAddr, httpsAddr: *httpsAddr, dir: *dir, pregen: *pregen}, stdout, stderr)
	case *warm || *cold:
		if *keysFile == "" {
			fmt.Fprintln(stderr, "bench: -warm and -cold need -keys")
			return 2
		}
		keys, err := readKeys(*keysFile)
		if err != nil {
			fmt.Fprintf(stderr, "bench: %v\n", err)
			return 1
		}
		if *cold {
			pairs := len(keys) / 2
			if nSet {
				pairs = int(*n)
			}
			return runColdMode(coldConfig{
				addr: *addr, mapName: *mapName, dnsAddr: *dnsAddr, httpsPort: *httpsPort, bareAsStsmap: *bareAsStsmap,
				timeout: *timeout, expect: socketmap.Word(cmp.Or(*expectWord, string(socketmap.WordOK))), maxErrShow: maxErrorsShown,
			}, keys, pairs, *caPath, *jsonOut, stdout, stderr)
		}
		return runWarmMode(config{addr: *addr, conns: *conns, timeout: *timeout, maxErrShow: maxErrorsShown,
			pool: makePool(*mapName, keys, expectClasses(len(keys), *expectWord)), expect: *expectWord != ""},
			*jsonOut, stdout, stderr)
	}

	if *floor {
		ln, err := listen(*addr)
		if err != nil {
			fmt.Fprintf(stderr, "bench: %v\n", err)
			return 1
		}
		fmt.Fprintf(stderr, "bench: floor responder pid %d on %s\n", os.Getpid(), ln.Addr())
		sig := make(chan os.Signal, 1)
		signal.Notify(sig, os.Interrupt, syscall.SIGTERM)
		go func() { <-sig; ln.Close() }()
		serveFloor(ln, []byte(*floorReply))
		return 0
	}

	if *conns < 1 || *pipeline < 1 || (*dur <= 0 && *n < 1) {
		fmt.Fprintln(stderr, "bench: -c, -pipeline and -n (or -d) must be positive")
		return 2
	}
	var pool []request
	if *keysFile != "" {
		keys, err := readKeys(*keysFile)
		if err != nil {
			fmt.Fprintf(stderr, "bench: %v\n", err)
			return 1
		}
		pool = makePool(*mapName, keys, expectClasses(len(keys), *expectWord))
	} else {
		mix, err := parseMix(*gen)
		if err != nil {
			fmt.Fprintf(stderr, "bench: %v\n", err)
			return 2
		}
		if *domains < 1 || *poolSize < 1 {
			fmt.Fprintln(stderr, "bench: -domains and -pool must be positive")
			return 2
		}
		keys, classes := genKeys(mix, *domains, *poolSize, *seed)
		pool = makePool(*mapName, keys, classes)
	}
	cfg := config{
		addr: *addr, conns: *conns, pipeline: *pipeline, mapName: *mapName,
		expect: *expect || *expectWord != "", timeout: *timeout, pool: pool, maxErrShow: maxErrorsShown,
	}
	if *dur > 0 {
		cfg.duration = *dur
	} else {
		cfg.total = *n
	}

	var srvBefore, cliBefore float64
	if *pid > 0 {
		var err error
		if srvBefore, err = procCPU(*pid); err != nil {
			fmt.Fprintf(stderr, "bench: -pid: %v\n", err)
			return 1
		}
	}
	cliBefore, cliErr := procCPU(os.Getpid())

	res := runClient(cfg)

	if *pid > 0 {
		after, err := procCPU(*pid)
		if err != nil {
			fmt.Fprintf(stderr, "bench: -pid: %v\n", err)
		} else {
			s := after - srvBefore
			res.ServerCPU = &s
			if res.Requests > 0 {
				us := s * 1e6 / float64(res.Requests)
				res.ServerUsRq = &us
			}
		}
	}
	if cliErr == nil {
		if after, err := procCPU(os.Getpid()); err == nil {
			s := after - cliBefore
			res.ClientCPU = &s
			if res.Requests > 0 {
				us := s * 1e6 / float64(res.Requests)
				res.ClientUsRq = &us
			}
		}
	}

	writeResult(stdout, *jsonOut, res, printResult)
	if res.Errors > 0 {
		return 1
	}
	return 0
}

// writeResult writes res as indented JSON (-json) or as text by print.
func writeResult[T any](w io.Writer, jsonOut bool, res T, print func(io.Writer, T)) {
	if !jsonOut {
		print(w, res)
		return
	}
	enc := json.NewEncoder(w)
	enc.SetIndent("", "  ")
	enc.Encode(res)
}

func printResult(w io.Writer, r result) {
	fmt.Fprintf(w, "connections  %d (pipeline %d)\n", r.Conns, r.Pipeline)
	fmt.Fprintf(w, "requests     %d\n", r.Requests)
	fmt.Fprintf(w, "errors       %d\n", r.Errors)
	fmt.Fprintf(w, "duration     %.3fs\n", r.DurationS)
	fmt.Fprintf(w, "requests/s   %.0f\n", r.RPS)
	fmt.Fprintf(w, "latency      p50 %v  p90 %v  p99 %v  p99.9 %v  max %v\n", r.P50, r.P90, r.P99, r.P999, r.Max)
	if r.ServerCPU != nil {
		fmt.Fprintf(w, "server CPU   %.2fs", *r.ServerCPU)
		if r.ServerUsRq != nil {
			fmt.Fprintf(w, "  %.2f µs/request", *r.ServerUsRq)
		}
		fmt.Fprintln(w)
	}
	if r.ClientCPU != nil {
		fmt.Fprintf(w, "client CPU   %.2fs", *r.ClientCPU)
		if r.ClientUsRq != nil {
			fmt.Fprintf(w, "  %.2f µs/request", *r.ClientUsRq)
		}
		fmt.Fprintln(w)
	}
	for _, e := range r.FirstErrs {
		fmt.Fprintf(w, "error: %s\n", e)
	}
}

// expectClasses returns the classes of n keys from a file that must all get
// the reply word want (OK or NOTFOUND), or nil for "".
func expectClasses(n int, want string) []int {
	if want == "" {
		return nil
	}
	class := classHit
	if want == string(socketmap.WordNotFound) {
		class = classNotFound
	}
	classes := make([]int, n)
	for i := range classes {
		classes[i] = class
	}
	return classes
}

// runWarmMode runs -warm.
func runWarmMode(cfg config, jsonOut bool, stdout, stderr io.Writer) int {
	if cfg.conns < 1 {
		fmt.Fprintln(stderr, "bench: -c must be positive")
		return 2
	}
	res := runWarm(cfg)
	writeResult(stdout, jsonOut, res, printWarm)
	if res.Errors > 0 || res.Answered < int64(res.Keys) {
		return 1
	}
	return 0
}

// runColdMode runs -cold over n pairs of keys: keys[2i] asked of stsmap,
// keys[2i+1] fetched bare.
func runColdMode(cfg coldConfig, keys []string, n int, caPath string, jsonOut bool, stdout, stderr io.Writer) int {
	if n < 1 || 2*n > len(keys) {
		fmt.Fprintf(stderr, "bench: -cold -n %d needs %d fresh keys, -keys has %d\n", n, 2*n, len(keys))
		return 2
	}
	if caPath != "" {
		pem, err := os.ReadFile(caPath)
		if err != nil {
			fmt.Fprintf(stderr, "bench: -ca: %v\n", err)
			return 1
		}
		cfg.roots = x509.NewCertPool()
		if !cfg.roots.AppendCertsFromPEM(pem) {
			fmt.Fprintf(stderr, "bench: -ca %s: no certificate\n", caPath)
			return 1
		}
	}
	for i := range n {
		cfg.stsmapKeys = append(cfg.stsmapKeys, keys[2*i])
		cfg.bareKeys = append(cfg.bareKeys, keys[2*i+1])
	}
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	res := runCold(ctx, cfg)
	writeResult(stdout, jsonOut, res, printCold)
	if res.Errors > 0 || ctx.Err() != nil {
		return 1
	}
	return 0
}

// network splits "unix:/path" from a TCP "host:port".
func network(addr string) (string, string) {
	if p, ok := strings.CutPrefix(addr, "unix:"); ok {
		return "unix", p
	}
	return "tcp", addr
}

func listen(addr string) (net.Listener, error) {
	return net.Listen(network(addr))
}

// serveFloor answers every netstring request on ln's connections with reply
// (a payload, sent as one netstring) until ln is closed.
func serveFloor(ln net.Listener, reply []byte) {
	wire := socketmap.AppendNetstring(nil, reply)
	var wg sync.WaitGroup
	defer wg.Wait()
	for {
		c, err := ln.Accept()
		if err != nil {
			if errors.Is(err, net.ErrClosed) {
				return
			}
			var ne net.Error
			if errors.As(err, &ne) && ne.Timeout() {
				continue
			}
			return
		}
		wg.Go(func() { floorConn(c, wire) })
	}
}

func floorConn(c net.Conn, wire []byte) {
	defer c.Close()
	br := bufio.NewReaderSize(c, 16<<10)
	bw := bufio.NewWriterSize(c, 16<<10)
	dec := socketmap.NewDecoder(br, maxReply)
	for {
		if _, err := dec.Next(); err != nil {
			return
		}
		if _, err := bw.Write(wire); err != nil {
			return
		}
		// Reply in batches: flush once no further request is buffered.
		if br.Buffered() == 0 {
			if err := bw.Flush(); err != nil {
				return
			}
		}
	}
}

// parseMix parses "hits=80,parent=10,miss=10" into weights for the hit,
// parent and miss classes.
func parseMix(s string) ([3]int, error) {
	var mix [3]int
	for part := range strings.SplitSeq(s, ",") {
		part = strings.TrimSpace(part)
		if part == "" {
			continue
		}
		name, val, ok := strings.Cut(part, "=")
		v, err := strconv.Atoi(val)
		if !ok || err != nil || v < 0 {
			return mix, fmt.Errorf("-gen: bad item %q", part)
		}
		switch name {
		case "hits", "hit":
			mix[0] = v
		case "parent", "parents":
			mix[1] = v
		case "miss", "misses":
			mix[2] = v
		default:
			return mix, fmt.Errorf("-gen: unknown class %q (want hits, parent, miss)", name)
		}
	}
	if mix[0]+mix[1]+mix[2] == 0 {
		return mix, errors.New("-gen: weights sum to zero")
	}
	return mix, nil
}

// genKeys generates n keys drawn with the weights of mix: hits d<i>.example
// and parent keys .d<i>.example for i < domains, misses m<random>.invalid.
func genKeys(mix [3]int, domains, n int, seed uint64) ([]string, []int) {
	rng := rand.New(rand.NewPCG(seed, seed^0x9e3779b97f4a7c15))
	sum := mix[0] + mix[1] + mix[2]
	keys := make([]string, n)
	classes := make([]int, n)
	for i := range n {
		r := rng.IntN(sum)
		switch {
		case r < mix[0]:
			keys[i] = "d" + strconv.Itoa(rng.IntN(domains)) + ".example"
			classes[i] = classHit
		case r < mix[0]+mix[1]:
			keys[i] = ".d" + strconv.Itoa(rng.IntN(domains)) + ".example"
			classes[i] = classParent
		default:
			keys[i] = "m" + strconv.FormatUint(rng.Uint64(), 36) + ".invalid"
			classes[i] = classMiss
		}
	}
	return keys, classes
}

func readKeys(path string) ([]string, error) {
	data, err := os.ReadFile(path)
	if err != nil {
		return nil, err
	}
	var keys []string
	for line := range strings.Lines(string(data)) {
		if k := strings.TrimSpace(line); k != "" {
			keys = append(keys, k)
		}
	}
	if len(keys) == 0 {
		return nil, fmt.Errorf("%s: no keys", path)
	}
	return keys, nil
}

// makePool encodes each key as a request netstring; classes may be nil.
func makePool(mapName string, keys []string, classes []int) []request {
	pool := make([]request, len(keys))
	for i, k := range keys {
		pool[i].wire = socketmap.AppendNetstring(nil, []byte(mapName+" "+k))
		if classes != nil {
			pool[i].class = classes[i]
		}
	}
	return pool
}

// checkReply validates a reply payload: a known reply word followed by a
// space (SPEC 1.3), and with expect the word expected for the key class.
func checkReply(p []byte, class int, expect bool) error {
	word, _, ok := strings.Cut(string(p), " ")
	if !ok {
		return fmt.Errorf("reply %q: no space after the reply word", trunc(p))
	}
	switch socketmap.Word(word) {
	case socketmap.WordOK, socketmap.WordNotFound, socketmap.WordTemp, socketmap.WordTimeout, socketmap.WordPerm:
	default:
		return fmt.Errorf("reply %q: unknown reply word", trunc(p))
	}
	if !expect {
		return nil
	}
	switch class {
	case classHit:
		if word != string(socketmap.WordOK) {
			return fmt.Errorf("hit key: reply %q, want OK", trunc(p))
		}
	case classParent, classMiss:
		if word != string(socketmap.WordNotFound) {
			return fmt.Errorf("parent/miss key: reply %q, want NOTFOUND", trunc(p))
		}
	case classNotFound:
		if word != string(socketmap.WordNotFound) {
			return fmt.Errorf("key: reply %q, want NOTFOUND", trunc(p))
		}
	}
	return nil
}

func trunc(p []byte) string {
	if len(p) > 80 {
		return string(p[:80]) + "..."
	}
	return string(p)
}

// errSink counts errors and keeps the first few messages.
type errSink struct {
	n    atomic.Int64
	mu   sync.Mutex
	msgs []string
	max  int
}

func (e *errSink) add(worker int, err error) {
	if e.n.Add(1) > int64(e.max) {
		return
	}
	e.mu.Lock()
	e.msgs = append(e.msgs, fmt.Sprintf("conn %d: %v", worker, err))
	e.mu.Unlock()
}

// runClient runs the load and returns the client-side result.
func runClient(cfg config) result {
	var (
		issued atomic.Int64
		errs   = errSink{max: cfg.maxErrShow}
		wg     sync.WaitGroup
		lats   = make([][]time.Duration, cfg.conns)
		done   = make([]int64, cfg.conns)
	)
	perWorker := 1 << 16
	if cfg.total > 0 {
		perWorker = int(cfg.total/int64(cfg.conns)) + cfg.pipeline + 1
		// Workers race for requests, so leave headroom for an uneven split.
		perWorker += perWorker / 4
	}
	for w := range cfg.conns {
		lats[w] = make([]time.Duration, 0, perWorker)
	}
	start := time.Now()
	var deadline time.Time
	if cfg.duration > 0 {
		deadline = start.Add(cfg.duration)
	}
	for w := range cfg.conns {
		wg.Go(func() {
			lats[w], done[w] = worker(cfg, w, &issued, deadline, lats[w], &errs)
		})
	}
	wg.Wait()
	elapsed := time.Since(start)

	var all []time.Duration
	var total int64
	for w := range cfg.conns {
		all = append(all, lats[w]...)
		total += done[w]
	}
	slices.Sort(all)
	res := result{
		Requests: total, Errors: errs.n.Load(), Duration: elapsed,
		DurationS: elapsed.Seconds(), FirstErrs: errs.msgs,
		Conns: cfg.conns, Pipeline: cfg.pipeline,
	}
	if elapsed > 0 {
		res.RPS = float64(total) / elapsed.Seconds()
	}
	res.P50, res.P90, res.P99, res.P999 = percentile(all, 50), percentile(all, 90), percentile(all, 99), percentile(all, 99.9)
	if len(all) > 0 {
		res.Max = all[len(all)-1]
	}
	us := func(d time.Duration) float64 { return float64(d) / float64(time.Microsecond) }
	res.LatencyUs = latencyJSON{us(res.P50), us(res.P90), us(res.P99), us(res.P999), us(res.Max)}
	return res
}

// worker drives one connection: it keeps up to cfg.pipeline requests in
// flight, records each latency from queuing the request to reading its
// reply, and returns its latencies and the number of replies read.
func worker(cfg config, id int, issued *atomic.Int64, deadline time.Time, lats []time.Duration, errs *errSink) ([]time.Duration, int64) {
	netw, a := network(cfg.addr)
	c, err := net.DialTimeout(netw, a, cfg.timeout)
	if err != nil {
		errs.add(id, err)
		return lats, 0
	}
	defer c.Close()
	br := bufio.NewReaderSize(c, 16<<10)
	bw := bufio.NewWriterSize(c, 16<<10)
	dec := socketmap.NewDecoder(br, maxReply)

	type slot struct {
		sent  time.Time
		class int
	}
	k := cfg.pipeline
	ring := make([]slot, k)
	head, inflight := 0, 0
	pos := id * len(cfg.pool) / cfg.conns
	stopped := false
	// send queues one request unless the run is over. Write errors are
	// sticky in bw and surface at the next Flush.
	send := func(now time.Time) bool {
		if stopped {
			return false
		}
		if cfg.total > 0 {
			if issued.Add(1) > cfg.total {
				stopped = true
				return false
			}
		} else if !now.Before(deadline) {
			stopped = true
			return false
		}
		r := &cfg.pool[pos]
		if pos++; pos == len(cfg.pool) {
			pos = 0
		}
		bw.Write(r.wire)
		ring[(head+inflight)%k] = slot{now, r.class}
		inflight++
		return true
	}

	var answered int64
	var lastDeadline time.Time
	now := time.Now()
	for inflight < k && send(now) {
	}
	for inflight > 0 {
		if now.Sub(lastDeadline) > cfg.timeout/4 {
			c.SetDeadline(now.Add(cfg.timeout))
			lastDeadline = now
		}
		// Flush only once the replies already buffered are consumed: every
		// buffered byte belongs to a reply to a request already sent, so
		// reading it cannot wait on the unflushed ones.
		if br.Buffered() == 0 {
			if err := bw.Flush(); err != nil {
				errs.add(id, fmt.Errorf("writing requests: %w", err))
				return lats, answered
			}
		}
		p, err := dec.Next()
		now = time.Now()
		if err != nil {
			errs.add(id, fmt.Errorf("reading reply (%d in flight): %w", inflight, err))
			return lats, answered
		}
		s := ring[head]
		head = (head + 1) % k
		inflight--
		answered++
		lats = append(lats, now.Sub(s.sent))
		if err := checkReply(p, s.class, cfg.expect); err != nil {
			errs.add(id, err)
		}
		for inflight < k && send(now) {
		}
	}
	return lats, answered
}

// percentile returns the p-th percentile (0 < p <= 100) of sorted by the
// nearest-rank method, or 0 for no samples.
func percentile(sorted []time.Duration, p float64) time.Duration {
	if len(sorted) == 0 {
		return 0
	}
	i := int(math.Ceil(p/100*float64(len(sorted)))) - 1
	return sorted[min(max(i, 0), len(sorted)-1)]
}

// procCPU returns the CPU time (utime+stime) of process pid in seconds, from
// fields 14 and 15 of /proc/PID/stat.
func procCPU(pid int) (float64, error) {
	data, err := os.ReadFile("/proc/" + strconv.Itoa(pid) + "/stat")
	if err != nil {
		return 0, err
	}
	return parseStat(string(data))
}

// parseStat parses the contents of /proc/PID/stat. The command name (field
// 2) is in parentheses and may itself contain spaces and parentheses, so the
// fields are counted from the last ')'.
func parseStat(s string) (float64, error) {
	i := strings.LastIndexByte(s, ')')
	if i < 0 {
		return 0, errors.New("/proc stat: no ')'")
	}
	f := strings.Fields(s[i+1:]) // f[0] is field 3 (state)
	if len(f) < 13 {
		return 0, errors.New("/proc stat: too few fields")
	}
	utime, err1 := strconv.ParseUint(f[14-3], 10, 64)
	stime, err2 := strconv.ParseUint(f[15-3], 10, 64)
	if err := errors.Join(err1, err2); err != nil {
		return 0, fmt.Errorf("/proc stat: %w", err)
	}
	return float64(utime+stime) / clkTck, nil
}
