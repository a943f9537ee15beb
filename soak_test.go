package main

import (
	"bufio"
	"bytes"
	"crypto/tls"
	"errors"
	"fmt"
	"io"
	"log"
	"math/rand/v2"
	"net"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"regexp"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/miekg/dns"

	"stsmap/internal/fixture"
)

// TestSoak runs a real stsmap process under a mix of lookups while the
// domains it looks up misbehave, and checks that it neither crashes, nor
// leaks, nor ever answers TEMP for a remote fault (SPEC 1.3) (issue 8).
//
//	STSMAP_SOAK=10m go test -count=1 -run TestSoak -v -timeout 30m .
//
// Without STSMAP_SOAK it runs for 10 s as part of the ordinary suite, so
// that it cannot rot. The daemon is this test binary in daemon mode (see
// runTestDaemon) with a config of the soak's own: a short refresh interval
// and negative TTL, so that refreshes, id changes and re-discovery happen
// during the run, and the bbolt store.
//
// What it looks up, through the fixture DNS (behind a front that can drop
// queries) and HTTPS policy hosts (behind a TLS SNI router that sends each
// policy host to the fixture, to a hostile server, or nowhere):
//   - cached enforce domains, healthy or with their TXT record failing or
//     timing out: always "OK secure match=..." exactly;
//   - domains whose id and policy change, some with the new policy failing:
//     always one of the policies they published;
//   - testing (the policy for a strict_testing map), none, no record,
//     unknown names, parent keys (".example"), IP literals and malformed
//     keys: NOTFOUND;
//   - short-lived policies (max_age 300) whose TXT record vanishes or fails:
//     their policy or NOTFOUND, counted as lapses;
//   - hostile domains, a fresh name each time from a pool per fault: bad
//     TXT records, SERVFAIL, dropped queries, CNAME loops, HTTP 404/500,
//     redirects, wrong or missing Content-Type, bodies too large, trickled,
//     cut short or unparsable, huge headers, bad certificates, a TLS
//     listener that never answers: NOTFOUND, or the policy for those that
//     are merely slow or large;
//   - malformed netstrings on throwaway connections: closed without reply.
//
// It samples the process's RSS, Go heap, cache entries, threads, open files
// and goroutines, and at the end checks that RSS grew by less than 64 MiB
// and that goroutines and open files came back near where they started.
func TestSoak(t *testing.T) {
	dur := soakDuration(t)
	s := newSoak(t, dur)
	start := s.warmUp()

	load := s.run(dur)
	s.checkAlive()

	s.checkConvergence()
	end := s.settle(start)
	s.report(start, end, load)
	s.checkDaemon()
	s.stop()
}

// Limits and settings of the soak.
const (
	soakEnv           = "STSMAP_SOAK"
	soakDefault       = 10 * time.Second
	soakMax           = 2 * time.Hour
	soakClients       = 16
	soakRate          = 1500 // requests per second over all clients, at most
	soakFirstContact  = 2 * time.Second
	soakFetchTimeout  = 8 * time.Second
	soakNegativeTTL   = 10 * time.Second
	soakRSSGrowth     = 64 << 20 // bytes
	soakGoroutineSlop = 20
	soakFDSlop        = 5
	soakZone          = "soak.example"
)

// soakDuration reads STSMAP_SOAK, bounded to soakMax.
func soakDuration(t *testing.T) time.Duration {
	t.Helper()
	v := os.Getenv(soakEnv)
	if v == "" {
		return soakDefault
	}
	d, err := time.ParseDuration(v)
	if err != nil || d <= 0 {
		t.Fatalf("%s=%q: want a positive Go duration such as 10m", soakEnv, v)
	}
	if d > soakMax {
		t.Fatalf("%s=%v: a soak is bounded to %v; run several if you need longer", soakEnv, d, soakMax)
	}
	// Warm-up, convergence, settle and shutdown take up to 4 minutes more.
	if dl, ok := t.Deadline(); ok && time.Until(dl) < d+4*time.Minute {
		t.Fatalf("%s=%v does not fit in the test timeout (%v left); pass -timeout %v", soakEnv, d, time.Until(dl).Round(time.Second), (d + 5*time.Minute).Round(time.Minute))
	}
	return d
}

// soak is one run: the fixtures, the daemon and what the clients saw.
type soak struct {
	t        *testing.T
	w        *fixture.World
	faults   *soakFaults
	d        *daemon
	metrics  string // base URL of the daemon's metrics listener
	scraper  *http.Client
	interval time.Duration // refresh.interval
	phase    time.Duration // faults change this often
	every    time.Duration // sampling cadence
	seed     uint64

	rotating []*soakRotating // id and policy change; the first soakCleanRotating never fail
	shorts   []string        // max_age 300, TXT vanishes or fails

	replies atomic.Int64 // replies read, over all connections
	viol    soakViolations

	mu      sync.Mutex // guards the fields below
	stats   soakStats
	samples []soakSample
}

// Synthetic domains, published in the fixture DNS and policy server.
const (
	soakEnforce       = 120 // e<i>: enforce, healthy
	soakDNSFaulted    = 40  // d<i>: enforce, TXT SERVFAIL or dropped at times
	soakCleanRotating = 30  // r<i>: id and policy change
	soakFailRotating  = 20  // f<i>: id and policy change, new policy failing for a while
	soakTesting       = 40  // t<i>
	soakNone          = 30  // n<i>
	soakShort         = 20  // s<i>: max_age 300
	soakAddressOnly   = 50  // a<i>: an A record, no TXT (NODATA)
	// soakUnknown and the pools of hostile names are small enough that
	// the caches are full within a minute or two: from then on their
	// content stays the same size while it keeps turning over (negative
	// TTL), so memory that grows is memory that leaks.
	soakUnknown = 4000
)

func soakName(prefix string, i int) string { return fmt.Sprintf("%s%d.%s", prefix, i, soakZone) }

// soakAnswer is the reply for an enforce policy with these mx patterns.
func soakAnswer(mx ...string) string {
	pats := make([]string, len(mx))
	for i, m := range mx {
		pats[i] = strings.TrimPrefix(m, "*")
	}
	return "OK secure match=" + strings.Join(pats, ":") + " servername=hostname"
}

func soakEnforceAnswer(domain string) string {
	return soakAnswer("mx."+domain, "*.mail."+soakZone)
}

// soakRotating is a domain whose policy changes during the run. Every
// version is added to valid before it is published, so a reply can never
// legitimately name a version valid does not hold.
type soakRotating struct {
	domain string
	fail   bool // new versions are served with an HTTPS fault for a phase

	mu     sync.Mutex
	next   int
	valid  map[string]bool
	latest string
}

func (r *soakRotating) answer(k int) string { return soakAnswer(fmt.Sprintf("mx%d.%s", k, r.domain)) }

func (r *soakRotating) check(reply string) string {
	r.mu.Lock()
	defer r.mu.Unlock()
	if !r.valid[reply] {
		return "not one of the published policies"
	}
	return ""
}

func newSoak(t *testing.T, dur time.Duration) *soak {
	s := &soak{
		t:        t,
		w:        newTestWorld(t),
		faults:   &soakFaults{drop: map[string]bool{}, https: map[string]string{}},
		interval: min(max(dur/60, 2*time.Second), 5*time.Second),
		phase:    min(max(dur/40, time.Second), 15*time.Second),
		every:    min(max(dur/60, time.Second), 10*time.Second),
		seed:     rand.Uint64(),
		scraper:  &http.Client{Transport: &http.Transport{DisableKeepAlives: true}, Timeout: 10 * time.Second},
	}
	t.Cleanup(s.scraper.CloseIdleConnections)
	s.publish()

	front := startSoakDNS(t, s.w.DNS, s.faults)
	hostile := startSoakHTTPS(t, s.w.CA, s.faults)
	router := startSNIRouter(t, func(sni string) string {
		switch fault := s.faults.httpsFault(sni); fault {
		case "":
			return s.w.Policy.Server.Listener.Addr().String()
		case "stall", "refused":
			return fault
		default:
			return hostile
		}
	})

	dir := t.TempDir()
	cfgPath := filepath.Join(dir, "soak.yaml")
	cfg := fmt.Sprintf(`listen: ["unix:%s"]
metrics:
  listen: "127.0.0.1:0"
admin:
  socket: "none"
dns:
  nameservers: [%q]
  timeout: 1s
fetch:
  first_contact_timeout: %v
  timeout: %v
cache:
  store: bolt
  path: %q
  negative_ttl: %v
maps:
  strict: {strict_testing: true}
  tlsrpt: {tlsrpt: true}
`, filepath.Join(dir, "stsmap.sock"), front, soakFirstContact, soakFetchTimeout, filepath.Join(dir, "policies.db"), soakNegativeTTL)
	if err := os.WriteFile(cfgPath, []byte(cfg), 0o644); err != nil {
		t.Fatal(err)
	}
	// startDaemon writes a config of its own; the later variables win
	// (os/exec keeps the last value of a repeated key), so the daemon
	// serves the soak's config on startDaemon's socket, with the metrics
	// listener on, the DNS front and the router.
	s.d = startDaemon(t, s.w, dir, "",
		daemonConfigEnv+"="+cfgPath, daemonDialEnv+"="+router, daemonRefreshEnv+"="+s.interval.String())
	addr := regexp.MustCompile(`msg="metrics listening" addr=(\S+)`)
	waitUntil(t, 30*time.Second, "the metrics listener", func() bool { return addr.MatchString(s.d.logs()) })
	s.metrics = "http://" + addr.FindStringSubmatch(s.d.logs())[1]
	t.Logf("soak %v: %d clients, at most %d requests/s, refresh every %v, faults change every %v, race detector %v, seed %d",
		dur, soakClients, soakRate, s.interval, s.phase, fixture.RaceEnabled(), s.seed)
	return s
}

// publish puts the synthetic domains in the fixture world.
func (s *soak) publish() {
	w, t := s.w, s.t
	for i := range soakEnforce {
		d := soakName("e", i)
		w.Publish(t, d, "1", "enforce", 86400, "mx."+d, "*.mail."+soakZone)
	}
	for i := range soakDNSFaulted {
		d := soakName("d", i)
		w.Publish(t, d, "1", "enforce", 86400, "mx."+d, "*.mail."+soakZone)
	}
	for i := range soakCleanRotating + soakFailRotating {
		r := &soakRotating{domain: soakName("r", i), valid: map[string]bool{}}
		if i >= soakCleanRotating {
			r.domain, r.fail = soakName("f", i-soakCleanRotating), true
		}
		r.latest, r.next = r.answer(0), 1
		r.valid[r.latest] = true
		w.Publish(t, r.domain, "v0", "enforce", 86400, "mx0."+r.domain)
		s.rotating = append(s.rotating, r)
	}
	for i := range soakTesting {
		d := soakName("t", i)
		w.Publish(t, d, "1", "testing", 86400, "mx."+d)
	}
	for i := range soakNone {
		w.Publish(t, soakName("n", i), "1", "none", 86400)
	}
	for i := range soakShort {
		d := soakName("s", i)
		w.Publish(t, d, "1", "enforce", 300, "mx."+d, "*.mail."+soakZone)
		s.shorts = append(s.shorts, d)
	}
	for i := range soakAddressOnly {
		w.DNS.Add(t, fmt.Sprintf("%s. 300 IN A 192.0.2.1", soakName("a", i)))
	}
}

// warmUp caches the domains whose answers the clients check exactly, and
// takes the first sample.
func (s *soak) warmUp() soakSample {
	t := s.t
	start, err := s.sample()
	if err != nil {
		t.Fatalf("first sample: %v", err)
	}
	s.samples = append(s.samples, start)
	type want struct{ req, reply string }
	var wants []want
	add := func(m, d, reply string) { wants = append(wants, want{m + " " + d, reply}) }
	for i := range soakEnforce {
		add("postfix", soakName("e", i), soakEnforceAnswer(soakName("e", i)))
	}
	for i := range soakDNSFaulted {
		add("postfix", soakName("d", i), soakEnforceAnswer(soakName("d", i)))
	}
	for _, d := range s.shorts {
		add("postfix", d, soakEnforceAnswer(d))
	}
	for _, r := range s.rotating {
		add("postfix", r.domain, r.latest)
	}
	for i := range soakTesting {
		d := soakName("t", i)
		add("strict", d, soakAnswer("mx."+d))
	}
	add("postfix", "example.com", exampleAnswer)
	add("postfix", "xn--bcher-kva.example", soakAnswer("mx.xn--bcher-kva.example"))

	deadline := time.Now().Add(60 * time.Second)
	work := make(chan want)
	var wg sync.WaitGroup
	for range 8 {
		wg.Go(func() {
			for w := range work {
				var got string
				ok := fixture.Poll(time.Until(deadline), 100*time.Millisecond, func() bool {
					got = s.askOnce(w.req)
					return got == w.reply
				})
				if !ok {
					t.Errorf("warm-up %q: got %q, want %q", w.req, got, w.reply)
				}
			}
		})
	}
	for _, w := range wants {
		work <- w
	}
	close(work)
	wg.Wait()
	if t.Failed() {
		t.FailNow()
	}
	t.Logf("warm-up: %d domains cached", len(wants))
	return start
}

// askOnce sends one request on a fresh connection; "" on any error.
func (s *soak) askOnce(req string) string {
	c, err := s.dial()
	if err != nil {
		return ""
	}
	defer c.close()
	r, err := c.roundTrip(req)
	if err != nil {
		return ""
	}
	return r[0]
}

// run drives the clients, the malformed-netstring sender, the fault
// schedule and the sampler for dur, and returns how long the clients ran.
func (s *soak) run(dur time.Duration) time.Duration {
	began := time.Now()
	done := make(chan struct{})
	var wg sync.WaitGroup
	for id := range soakClients {
		wg.Go(func() { s.client(done, id) })
	}
	wg.Go(func() { s.malformed(done) })
	wg.Go(func() { s.schedule(done) })
	wg.Go(func() { s.sampler(done) })
	timer := time.NewTimer(dur)
	defer timer.Stop()
	<-timer.C
	close(done)
	elapsed := time.Since(began)
	wg.Wait()
	s.faults.healAll(s)
	return elapsed
}

// soakStats counts what clients saw.
type soakStats struct {
	requests   int64
	kinds      map[string]int64 // OK, NOTFOUND, TEMP, TIMEOUT, PERM, invalid
	categories map[string]int64
	lapses     int64 // NOTFOUND for a short-lived enforce policy
	reconnects int64
	malformed  int64 // malformed netstrings sent
	latency    [6]int64
	maxLatency time.Duration
}

var soakLatencyBounds = [...]time.Duration{time.Millisecond, 10 * time.Millisecond, 100 * time.Millisecond, time.Second, 3 * time.Second}

func (st *soakStats) observe(d time.Duration) {
	i := 0
	for i < len(soakLatencyBounds) && d >= soakLatencyBounds[i] {
		i++
	}
	st.latency[i]++
	st.maxLatency = max(st.maxLatency, d)
}

func (st *soakStats) merge(o *soakStats) {
	st.requests += o.requests
	st.lapses += o.lapses
	st.reconnects += o.reconnects
	st.malformed += o.malformed
	for i := range st.latency {
		st.latency[i] += o.latency[i]
	}
	st.maxLatency = max(st.maxLatency, o.maxLatency)
	if st.kinds == nil {
		st.kinds, st.categories = map[string]int64{}, map[string]int64{}
	}
	for k, v := range o.kinds {
		st.kinds[k] += v
	}
	for k, v := range o.categories {
		st.categories[k] += v
	}
}

// soakViolations collects broken invariants; the first few are kept.
type soakViolations struct {
	mu    sync.Mutex
	n     int
	first []string
}

func (v *soakViolations) add(format string, args ...any) {
	v.mu.Lock()
	defer v.mu.Unlock()
	v.n++
	if len(v.first) < 20 {
		v.first = append(v.first, fmt.Sprintf(format, args...))
	}
}

// soakRequest is one lookup and what its reply must be.
type soakRequest struct {
	category string
	req      string
	// check returns why reply is wrong, or "".
	check func(reply string) string
}

func exactly(want string) func(string) string {
	return func(got string) string {
		if got != want {
			return fmt.Sprintf("want %q", want)
		}
		return ""
	}
}

func notFound(got string) string {
	if got != "NOTFOUND " {
		return `want "NOTFOUND "`
	}
	return ""
}

func exactlyOrNotFound(want string) func(string) string {
	return func(got string) string {
		if got != want && got != "NOTFOUND " {
			return fmt.Sprintf("want %q or NOTFOUND", want)
		}
		return ""
	}
}

// replyKind checks the reply is a socketmap reply (SPEC 1.3) and names its
// word.
func replyKind(reply string) string {
	word, data, _ := strings.Cut(reply, " ")
	switch word {
	case "OK":
		if data != "" {
			return word
		}
	case "NOTFOUND", "TEMP", "TIMEOUT", "PERM":
		if strings.HasPrefix(reply, word+" ") {
			return word
		}
	}
	return "invalid"
}

// soakHostileClients of the clients ask mostly for hostile domains, whose
// lookups may wait out the first-contact timeout; the others ask as a busy
// Postfix does, mostly for cached domains.
const soakHostileClients = 4

// client is one Postfix smtp(8) process: one request in flight per
// connection, the connection reused and now and then replaced; client 0
// connects afresh for every request, like postmap -q.
func (s *soak) client(done <-chan struct{}, id int) {
	hostile := id >= soakClients-soakHostileClients
	rng := rand.New(rand.NewPCG(s.seed, uint64(id)))
	st := &soakStats{kinds: map[string]int64{}, categories: map[string]int64{}}
	defer func() {
		s.mu.Lock()
		s.stats.merge(st)
		s.mu.Unlock()
	}()
	tick := time.NewTicker(soakClients * time.Second / soakRate)
	defer tick.Stop()
	var c *soakConn
	defer func() {
		if c != nil {
			c.close()
		}
	}()
	for {
		select {
		case <-done:
			return
		case <-tick.C:
		}
		reqs := []soakRequest{s.pick(rng, hostile)}
		if rng.IntN(50) == 0 { // SPEC 1.2: pipelined requests are answered in order
			reqs = append(reqs, s.pick(rng, hostile), s.pick(rng, hostile))
		}
		if c == nil {
			var err error
			if c, err = s.dial(); err != nil {
				s.viol.add("client %d: connect: %v", id, err)
				continue
			}
		}
		lines := make([]string, len(reqs))
		for i, r := range reqs {
			lines[i] = r.req
		}
		began := time.Now()
		replies, err := c.roundTrip(lines...)
		st.observe(time.Since(began))
		if err != nil {
			// The daemon closes a connection only when idle for a minute.
			s.viol.add("client %d: %q: %v", id, soakClip(lines[0]), err)
			c.close()
			c = nil
			continue
		}
		for i, r := range reqs {
			reply := replies[i]
			st.requests++
			kind := replyKind(reply)
			st.kinds[kind]++
			st.categories[r.category]++
			if r.category == "short" && reply == "NOTFOUND " {
				st.lapses++
			}
			if why := r.check(reply); kind != "OK" && kind != "NOTFOUND" || why != "" {
				s.viol.add("%s %q: got %q: %s", r.category, soakClip(r.req), soakClip(reply), why)
			}
		}
		if id == 0 || rng.IntN(100) == 0 {
			c.close()
			c = nil
			st.reconnects++
		}
	}
}

func soakClip(s string) string {
	if len(s) > 120 {
		return s[:120] + "..."
	}
	return s
}

// keySpellings are ways Postfix may ask for a domain's policy (SPEC 2.2,
// 2.3).
var keySpellings = []func(string) string{
	func(d string) string { return d },
	func(d string) string { return d },
	func(d string) string { return d },
	strings.ToUpper,
	func(d string) string { return d + "." },
	func(d string) string { return "[" + d + "]" },
	func(d string) string { return "[" + d + "]:587" },
	func(d string) string { return d + ":25" },
	func(d string) string { return "  " + d + " " },
}

// malformedKeys are never looked up (SPEC 2.4) or find nothing.
var malformedKeys = []string{
	"",
	strings.Repeat("a", 64) + ".example",
	strings.Repeat("abcdefgh.", 30) + "example",
	"bad_char!.example",
	"a..b.example",
	"/var/spool/postfix/private/lmtp",
	"[unclosed.example",
	"exa mple.example",
	"\x00\x01\x7f.example",
	"xn--zz.example",
	"\xff\xfe.example",
	"*.example",
	strings.Repeat("x", 9000),
	"example.com:notaport",
	"[example.com]:99999",
}

var ipLiterals = []string{"[192.0.2.1]", "[192.0.2.1]:25", "192.0.2.1", "[ipv6:2001:db8::1]", "[2001:db8::1]:25", "2001:db8::1", "[::1]"}

// pick draws the next lookup from the mix: for a hostile client, half are
// hostile domains; for the others, 2 in 100.
func (s *soak) pick(rng *rand.Rand, hostile bool) soakRequest {
	spell := func(d string) string { return keySpellings[rng.IntN(len(keySpellings))](d) }
	n := rng.IntN(100)
	switch {
	case hostile && n < 50:
		n = 99
	case hostile:
		n = rng.IntN(98)
	}
	switch {
	case n < 48:
		var d, want string
		switch k := rng.IntN(soakEnforce + 2); k {
		case soakEnforce:
			d, want = "example.com", exampleAnswer
		case soakEnforce + 1:
			d, want = "bücher.example", soakAnswer("mx.xn--bcher-kva.example")
		default:
			d = soakName("e", k)
			want = soakEnforceAnswer(d)
		}
		switch m := rng.IntN(10); {
		case m == 0:
			return soakRequest{"cached", "anymap " + spell(d), exactly(want)}
		case m == 1 && d != "bücher.example":
			prefix := want + " policy_type=sts policy_domain=" + strings.TrimSuffix(strings.ToLower(d), ".")
			return soakRequest{"cached", "tlsrpt " + d, func(got string) string {
				if !strings.HasPrefix(got, prefix) {
					return fmt.Sprintf("want %q...", prefix)
				}
				return ""
			}}
		}
		return soakRequest{"cached", "postfix " + spell(d), exactly(want)}
	case n < 56:
		d := soakName("d", rng.IntN(soakDNSFaulted))
		return soakRequest{"dns-faulted", "postfix " + spell(d), exactly(soakEnforceAnswer(d))}
	case n < 62:
		r := s.rotating[rng.IntN(len(s.rotating))]
		return soakRequest{"rotating", "postfix " + r.domain, r.check}
	case n < 66:
		d := soakName("t", rng.IntN(soakTesting))
		if rng.IntN(2) == 0 {
			return soakRequest{"testing", "strict " + spell(d), exactly(soakAnswer("mx." + d))}
		}
		return soakRequest{"testing", "postfix " + spell(d), notFound}
	case n < 68:
		return soakRequest{"none", "postfix " + spell(soakName("n", rng.IntN(soakNone))), notFound}
	case n < 71:
		d := s.shorts[rng.IntN(len(s.shorts))]
		return soakRequest{"short", "postfix " + d, exactlyOrNotFound(soakEnforceAnswer(d))}
	case n < 83:
		d := soakName("u", rng.IntN(soakUnknown))
		if rng.IntN(5) == 0 {
			d = soakName("a", rng.IntN(soakAddressOnly))
		}
		return soakRequest{"uncached", "postfix " + spell(d), notFound}
	case n < 88:
		parents := []string{"." + soakName("e", rng.IntN(soakEnforce)), "." + soakZone, ".example", ".com"}
		return soakRequest{"parent", "postfix " + parents[rng.IntN(len(parents))], notFound}
	case n < 91:
		return soakRequest{"ip-literal", "postfix " + ipLiterals[rng.IntN(len(ipLiterals))], notFound}
	case n < 98:
		return soakRequest{"malformed-key", "postfix " + malformedKeys[rng.IntN(len(malformedKeys))], notFound}
	default:
		fault := hostileFaultNames[rng.IntN(len(hostileFaultNames))]
		spec := hostileFaults[fault]
		d := fmt.Sprintf("h%d-%s.%s", rng.IntN(spec.pool), fault, soakZone)
		return soakRequest{"hostile", "postfix " + d, func(got string) string { return spec.check(d, got) }}
	}
}

// hostileSpec is a fault every instance h<i>-<fault>.soak.example shows.
type hostileSpec struct {
	pool  int // instances; a fresh one is likely not cached yet
	check func(domain, reply string) string
}

func hostileNotFound(_, got string) string { return notFound(got) }

func hostileSlow(d, got string) string { return exactlyOrNotFound(soakAnswer("mx." + d))(got) }

// hostileFaults: DNS faults are served by soakDNS, HTTPS faults by
// soakHTTPS, TLS faults by its certificates, stall and refused by the
// router.
var hostileFaults = map[string]hostileSpec{
	// DNS (SPEC 3)
	"servfail":  {100, hostileNotFound},
	"drop":      {50, hostileNotFound}, // the TXT query times out
	"twotxt":    {100, hostileNotFound},
	"badtxt":    {100, hostileNotFound},
	"longid":    {100, hostileNotFound},
	"spf":       {100, hostileNotFound},
	"cnameloop": {100, hostileNotFound},
	"noa":       {100, hostileNotFound}, // no address for the policy host
	"dropa":     {50, hostileNotFound},  // the policy host's A query times out
	"cname":     {20, hostileSlow},      // delegated with a CNAME (RFC 8461 §8.2): a policy
	"hugetxt":   {20, hostileSlow},      // a 2 KB record with extensions
	// HTTPS (SPEC 4, 5)
	"status404":   {100, hostileNotFound},
	"status500":   {100, hostileNotFound},
	"redirect":    {100, hostileNotFound},
	"ctype":       {100, hostileNotFound},
	"noctype":     {100, hostileNotFound},
	"big":         {100, hostileNotFound},
	"bigdeclared": {100, hostileNotFound},
	"garbage":     {100, hostileNotFound},
	"nomx":        {100, hostileNotFound},
	"truncated":   {100, hostileNotFound},
	"hugeheader":  {100, hostileNotFound},
	"trickle":     {30, hostileNotFound}, // never finishes
	"slow":        {20, hostileSlow},     // finishes after the first-contact timeout
	"bigmx":       {20, hostileBigMX},    // a 60 KB policy
	// TLS
	"wrongcert":  {100, hostileNotFound},
	"selfsigned": {100, hostileNotFound},
	"expired":    {100, hostileNotFound},
	"stall":      {30, hostileNotFound}, // no ServerHello ever
	"refused":    {100, hostileNotFound},
}

var hostileFaultNames = func() []string {
	var names []string
	for n := range hostileFaults {
		names = append(names, n)
	}
	slices.Sort(names)
	return names
}()

// hostileBigMX: a policy with as many mx as 60 KB hold is answered in
// full, under Postfix's reply limit (SPEC 1.4), or not yet.
func hostileBigMX(d, got string) string {
	if got == "NOTFOUND " {
		return ""
	}
	if !strings.HasPrefix(got, "OK secure match=m0."+d+":m1."+d+":") || len(got) >= 100000 {
		return "want the whole policy under 100000 bytes"
	}
	return ""
}

// hostileName is a name under h<i>-<fault>.soak.example.
type hostileName struct {
	domain, fault, instance string
	part                    string // "txt" (_mta-sts.), "host" (mta-sts.) or "" (the domain)
}

func parseHostile(name string) (hostileName, bool) {
	name = strings.TrimSuffix(strings.ToLower(name), ".")
	rest, ok := strings.CutSuffix(name, "."+soakZone)
	if !ok {
		return hostileName{}, false
	}
	var h hostileName
	if r, ok := strings.CutPrefix(rest, "_mta-sts."); ok {
		rest, h.part = r, "txt"
	} else if r, ok := strings.CutPrefix(rest, "mta-sts."); ok {
		rest, h.part = r, "host"
	}
	inst, fault, ok := strings.Cut(rest, "-")
	if !ok || len(inst) < 2 || inst[0] != 'h' || strings.Trim(inst[1:], "0123456789") != "" {
		return hostileName{}, false
	}
	if _, ok := hostileFaults[fault]; !ok {
		return hostileName{}, false
	}
	h.domain, h.fault, h.instance = rest+"."+soakZone, fault, inst[1:]
	return h, true
}

// soakFaults holds the faults the schedule switches on and off.
type soakFaults struct {
	mu    sync.Mutex
	drop  map[string]bool   // DNS names (lowercase, fully qualified) whose queries go unanswered
	https map[string]string // policy host -> HTTPS fault, over what its name says
}

func (f *soakFaults) setDrop(name string, on bool) {
	f.mu.Lock()
	defer f.mu.Unlock()
	if on {
		f.drop[dns.Fqdn(name)] = true
	} else {
		delete(f.drop, dns.Fqdn(name))
	}
}

func (f *soakFaults) dropped(name string) bool {
	f.mu.Lock()
	defer f.mu.Unlock()
	return f.drop[name]
}

func (f *soakFaults) setHTTPS(host, fault string) {
	f.mu.Lock()
	defer f.mu.Unlock()
	if fault == "" {
		delete(f.https, host)
	} else {
		f.https[host] = fault
	}
}

// httpsFault is the fault of a policy host: set by the schedule, or named
// by a hostile domain.
func (f *soakFaults) httpsFault(host string) string {
	host = strings.ToLower(host)
	f.mu.Lock()
	fault, ok := f.https[host]
	f.mu.Unlock()
	if ok {
		return fault
	}
	if h, ok := parseHostile(host); ok && h.part == "host" {
		return h.fault
	}
	return ""
}

// healAll lifts the scheduled faults.
func (f *soakFaults) healAll(s *soak) {
	f.mu.Lock()
	clear(f.drop)
	clear(f.https)
	f.mu.Unlock()
	for i := range soakDNSFaulted {
		s.w.DNS.SetRcode("_mta-sts."+soakName("d", i), dns.TypeTXT, dns.RcodeSuccess)
	}
	for _, d := range s.shorts {
		s.w.DNS.SetRcode("_mta-sts."+d, dns.TypeTXT, dns.RcodeSuccess)
	}
}

// schedule changes the faults every phase: TXT records fail, time out and
// vanish; ids and policies change, some with a failing new policy.
func (s *soak) schedule(done <-chan struct{}) {
	t := goroutineT{s.t}
	tick := time.NewTicker(s.phase)
	defer tick.Stop()
	vanished := make([]bool, len(s.shorts))
	// Short-lived policies get their faults at random, so that their
	// expiry does not keep falling into the same state of a cycle.
	rng := rand.New(rand.NewPCG(s.seed, 1<<32))
	rotatingFaults := []string{"status500", "status404", "ctype", "trickle", "stall"}
	for phase := 1; ; phase++ {
		select {
		case <-done:
			for i, gone := range vanished {
				if gone {
					s.w.DNS.Add(t, fmt.Sprintf(`_mta-sts.%s. 300 IN TXT "v=STSv1; id=1"`, s.shorts[i]))
				}
			}
			return
		case <-tick.C:
		}
		for i := range soakDNSFaulted {
			name := "_mta-sts." + soakName("d", i)
			state := (phase + i) % 3
			s.w.DNS.SetRcode(name, dns.TypeTXT, servfailIf(state == 1))
			s.faults.setDrop(name, state == 2)
		}
		for i, d := range s.shorts {
			name := "_mta-sts." + d
			state := rng.IntN(4) // healthy, vanished, healthy, failing
			if gone := state == 1; gone != vanished[i] {
				if gone {
					s.w.DNS.Remove(name, dns.TypeTXT)
				} else {
					s.w.DNS.Add(t, fmt.Sprintf(`%s. 300 IN TXT "v=STSv1; id=1"`, name))
				}
				vanished[i] = gone
			}
			s.w.DNS.SetRcode(name, dns.TypeTXT, servfailIf(state == 3))
			s.faults.setDrop(name, state == 3 && i%2 == 0)
		}
		for i, r := range s.rotating {
			host := "mta-sts." + r.domain
			if r.fail {
				s.faults.setHTTPS(host, "")
				if (phase+i)%3 == 0 {
					s.rotate(t, r, rotatingFaults[(phase/3+i)%len(rotatingFaults)])
				}
				continue
			}
			if (phase+i)%4 == 0 {
				s.rotate(t, r, "")
			}
		}
	}
}

func servfailIf(fail bool) int {
	if fail {
		return dns.RcodeServerFailure
	}
	return dns.RcodeSuccess
}

// rotate publishes the next version of r's policy and then its new id, as
// an operator would; with fault, the policy host shows that fault until the
// next phase.
func (s *soak) rotate(t fixture.T, r *soakRotating, fault string) {
	r.mu.Lock()
	k := r.next
	r.next++
	r.latest = r.answer(k)
	r.valid[r.latest] = true
	r.mu.Unlock()
	if fault != "" {
		s.faults.setHTTPS("mta-sts."+r.domain, fault)
	}
	s.w.Policy.SetPolicy(r.domain, fixture.PolicyBody("enforce", 86400, fmt.Sprintf("mx%d.%s", k, r.domain)))
	s.w.DNS.Remove("_mta-sts."+r.domain, dns.TypeTXT)
	s.w.DNS.Add(t, fmt.Sprintf(`_mta-sts.%s. 300 IN TXT "v=STSv1; id=v%d"`, r.domain, k))
}

// goroutineT lets the fixtures report from a goroutine other than the
// test's, where Fatalf must not be called.
type goroutineT struct{ t *testing.T }

func (g goroutineT) Helper()                   {}
func (g goroutineT) Cleanup(f func())          { g.t.Cleanup(f) }
func (g goroutineT) Fatalf(f string, a ...any) { g.t.Errorf(f, a...) }

// malformed sends broken netstrings on throwaway connections: each must be
// closed without a reply (SPEC 1.1), after the reply to a valid request
// before it.
func (s *soak) malformed(done <-chan struct{}) {
	valid := netstring("postfix " + soakName("e", 0))
	cases := []struct{ name, send string }{
		{"non-digit length", "abc:"},
		{"leading zero", "01:a,"},
		{"missing comma", "5:hello;"},
		{"over the size limit", "99999:"},
		{"ten-digit length", "1234567890:"},
		{"request without a space", "7:postfix,"},
		{"empty request", "0:,"},
		{"valid, then garbage", valid + "x:"},
		{"cut short", "30:postfix e0"},
	}
	var sent int64
	defer func() {
		s.mu.Lock()
		s.stats.malformed += sent
		s.mu.Unlock()
	}()
	tick := time.NewTicker(50 * time.Millisecond)
	defer tick.Stop()
	for i := 0; ; i++ {
		select {
		case <-done:
			return
		case <-tick.C:
		}
		tc := cases[i%len(cases)]
		c, err := net.Dial("unix", s.d.sock)
		if err != nil {
			s.viol.add("malformed %s: connect: %v", tc.name, err)
			continue
		}
		sent++
		c.SetDeadline(time.Now().Add(10 * time.Second))
		io.WriteString(c, tc.send)
		if tc.name == "cut short" {
			c.(*net.UnixConn).CloseWrite()
		}
		got, err := io.ReadAll(c)
		c.Close()
		want := ""
		if strings.HasPrefix(tc.send, valid) {
			want = netstring(soakEnforceAnswer(soakName("e", 0)))
			if string(got) == want {
				s.replies.Add(1)
			}
		}
		if err != nil || string(got) != want {
			s.viol.add("malformed %s: got %q (%v), want %q and the connection closed", tc.name, soakClip(string(got)), err, want)
		}
	}
}

// soakConn is a client connection.
type soakConn struct {
	s *soak
	c net.Conn
	r *bufio.Reader
}

func (s *soak) dial() (*soakConn, error) {
	c, err := net.Dial("unix", s.d.sock)
	if err != nil {
		return nil, err
	}
	return &soakConn{s: s, c: c, r: bufio.NewReader(c)}, nil
}

func (c *soakConn) close() { c.c.Close() }

// roundTrip writes the requests at once and reads a reply to each.
func (c *soakConn) roundTrip(reqs ...string) ([]string, error) {
	c.c.SetDeadline(time.Now().Add(30 * time.Second))
	var b strings.Builder
	for _, r := range reqs {
		b.WriteString(netstring(r))
	}
	if _, err := io.WriteString(c.c, b.String()); err != nil {
		return nil, err
	}
	replies := make([]string, len(reqs))
	for i := range reqs {
		n := 0
		for digits := 0; ; digits++ {
			b, err := c.r.ReadByte()
			switch {
			case err != nil:
				return nil, fmt.Errorf("reply %d: %w", i, err)
			case b == ':' && digits > 0:
			case b < '0' || b > '9' || digits > 6:
				return nil, fmt.Errorf("reply %d: bad length byte %q", i, b)
			default:
				n = n*10 + int(b-'0')
				continue
			}
			break
		}
		buf := make([]byte, n+1)
		if _, err := io.ReadFull(c.r, buf); err != nil {
			return nil, fmt.Errorf("reply %d: %w", i, err)
		}
		if buf[n] != ',' {
			return nil, fmt.Errorf("reply %d: no comma", i)
		}
		replies[i] = string(buf[:n])
		c.s.replies.Add(1)
	}
	return replies, nil
}

// soakSample is the daemon's state at one time.
type soakSample struct {
	at                       time.Time
	rssKiB, fileKiB          int64 // resident, and of that file-backed (bbolt's mmap)
	heapKiB                  int64 // Go heap in use
	entries                  int64 // policy cache entries, negative and expired included
	threads, fds, goroutines int64
}

// sample reads /proc for the daemon process and scrapes go_goroutines.
func (s *soak) sample() (soakSample, error) {
	pid := s.d.cmd.Process.Pid
	smp := soakSample{at: time.Now()}
	status, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", pid))
	if err != nil {
		return smp, err
	}
	for line := range strings.Lines(string(status)) {
		k, v, _ := strings.Cut(line, ":")
		f := strings.Fields(v)
		switch {
		case k == "State" && len(f) > 0 && (f[0] == "Z" || f[0] == "X"):
			return smp, fmt.Errorf("the daemon is dead (%s)", strings.TrimSpace(v))
		case k == "VmRSS" && len(f) > 0:
			smp.rssKiB, _ = strconv.ParseInt(f[0], 10, 64)
		case k == "RssFile" && len(f) > 0:
			smp.fileKiB, _ = strconv.ParseInt(f[0], 10, 64)
		case k == "Threads" && len(f) > 0:
			smp.threads, _ = strconv.ParseInt(f[0], 10, 64)
		}
	}
	// Counted before the scrape, whose connection is not the daemon's own.
	fds, err := os.ReadDir(fmt.Sprintf("/proc/%d/fd", pid))
	if err != nil {
		return smp, err
	}
	smp.fds = int64(len(fds))
	m, err := s.scrape()
	if err != nil {
		return smp, err
	}
	smp.goroutines = int64(m["go_goroutines"])
	smp.heapKiB = int64(m["go_memstats_heap_inuse_bytes"] / 1024)
	smp.entries = int64(m["stsmap_cache_entries"])
	return smp, nil
}

// scrape reads the daemon's metrics: series (name{labels}) -> value.
func (s *soak) scrape() (map[string]float64, error) {
	resp, err := s.scraper.Get(s.metrics + "/metrics")
	if err != nil {
		return nil, err
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		return nil, fmt.Errorf("metrics: status %d", resp.StatusCode)
	}
	m := map[string]float64{}
	sc := bufio.NewScanner(resp.Body)
	for sc.Scan() {
		line := sc.Text()
		if line == "" || line[0] == '#' {
			continue
		}
		i := strings.LastIndexByte(line, ' ')
		if v, err := strconv.ParseFloat(line[i+1:], 64); i > 0 && err == nil {
			m[line[:i]] = v
		}
	}
	return m, sc.Err()
}

// sampler samples the daemon every s.every while the load runs.
func (s *soak) sampler(done <-chan struct{}) {
	tick := time.NewTicker(s.every)
	defer tick.Stop()
	for {
		select {
		case <-done:
			return
		case <-tick.C:
		}
		smp, err := s.sample()
		if err != nil {
			s.viol.add("sample: %v", err)
			continue
		}
		s.mu.Lock()
		s.samples = append(s.samples, smp)
		s.mu.Unlock()
	}
}

// checkConvergence: domains whose new ids were always fetchable answer
// their latest policy within a few refresh intervals (SPEC 6.4).
func (s *soak) checkConvergence() {
	deadline := time.Now().Add(3*s.interval + soakFetchTimeout + 10*time.Second)
	for _, r := range s.rotating {
		if r.fail {
			continue
		}
		r.mu.Lock()
		want := r.latest
		r.mu.Unlock()
		var got string
		if !fixture.Poll(time.Until(deadline), 100*time.Millisecond, func() bool {
			got = s.askOnce("postfix " + r.domain)
			return got == want
		}) {
			s.t.Errorf("%s: after the load, got %q, want its latest policy %q", r.domain, got, want)
		}
	}
}

// settle waits for the daemon to come back to its goroutines and open
// files of the start, once stalled fetches have timed out, and returns the
// last sample.
func (s *soak) settle(start soakSample) soakSample {
	var end soakSample
	var err error
	fixture.Poll(soakFetchTimeout+60*time.Second, 100*time.Millisecond, func() bool {
		end, err = s.sample()
		return err == nil && end.goroutines <= start.goroutines+soakGoroutineSlop && end.fds <= start.fds+soakFDSlop
	})
	if err != nil {
		s.t.Fatalf("last sample: %v\n%s", err, soakTail(s.d.logs()))
	}
	s.samples = append(s.samples, end)
	return end
}

// report logs the figures of the run and checks them.
func (s *soak) report(start, end soakSample, load time.Duration) {
	t := s.t
	st := s.stats
	var peak soakSample
	for _, smp := range s.samples {
		peak.rssKiB, peak.fileKiB, peak.heapKiB = max(peak.rssKiB, smp.rssKiB), max(peak.fileKiB, smp.fileKiB), max(peak.heapKiB, smp.heapKiB)
		peak.entries, peak.threads = max(peak.entries, smp.entries), max(peak.threads, smp.threads)
		peak.fds, peak.goroutines = max(peak.fds, smp.fds), max(peak.goroutines, smp.goroutines)
	}
	var b strings.Builder
	fmt.Fprintf(&b, "soak over %v of load:\n", load.Round(time.Second))
	fmt.Fprintf(&b, "  %-13s %10s %10s %10s\n", "", "start", "end", "peak")
	mib := func(kib int64) string { return fmt.Sprintf("%.1f", float64(kib)/1024) }
	fmt.Fprintf(&b, "  %-13s %10s %10s %10s\n", "RSS MiB", mib(start.rssKiB), mib(end.rssKiB), mib(peak.rssKiB))
	fmt.Fprintf(&b, "  %-13s %10s %10s %10s\n", "of it file", mib(start.fileKiB), mib(end.fileKiB), mib(peak.fileKiB))
	fmt.Fprintf(&b, "  %-13s %10s %10s %10s\n", "Go heap MiB", mib(start.heapKiB), mib(end.heapKiB), mib(peak.heapKiB))
	fmt.Fprintf(&b, "  %-13s %10d %10d %10d\n", "cache entries", start.entries, end.entries, peak.entries)
	fmt.Fprintf(&b, "  %-13s %10d %10d %10d\n", "goroutines", start.goroutines, end.goroutines, peak.goroutines)
	fmt.Fprintf(&b, "  %-13s %10d %10d %10d\n", "open fds", start.fds, end.fds, peak.fds)
	fmt.Fprintf(&b, "  %-13s %10d %10d %10d\n", "threads", start.threads, end.threads, peak.threads)
	fmt.Fprintf(&b, "  requests %d (%.0f/s), reconnects %d, malformed netstrings %d\n",
		st.requests, float64(st.requests)/load.Seconds(), st.reconnects, st.malformed)
	fmt.Fprintf(&b, "  replies:")
	for _, k := range []string{"OK", "NOTFOUND", "TEMP", "TIMEOUT", "PERM", "invalid"} {
		fmt.Fprintf(&b, " %s %d", k, st.kinds[k])
	}
	fmt.Fprintf(&b, "\n  by category:")
	for _, k := range slices.Sorted(func(yield func(string) bool) {
		for k := range st.categories {
			if !yield(k) {
				return
			}
		}
	}) {
		fmt.Fprintf(&b, " %s %d", k, st.categories[k])
	}
	fmt.Fprintf(&b, "\n  short-lived policies lapsed (NOTFOUND): %d\n", st.lapses)
	if st.lapses > 0 {
		// Their policy host never fails: a refresher that renews over
		// HTTPS when the TXT lookup fails near expiry (SPEC 6.4, RFC 8461
		// §10.2) never lets them lapse once the warm-up cached them.
		s.t.Errorf("%d lookups of short-lived enforce policies (max_age 300) got NOTFOUND although their policy host never failed: they were not renewed over HTTPS before expiry (SPEC 6.4)", st.lapses)
	}
	fmt.Fprintf(&b, "  latency: <1ms %d, <10ms %d, <100ms %d, <1s %d, <3s %d, >=3s %d; max %v\n",
		st.latency[0], st.latency[1], st.latency[2], st.latency[3], st.latency[4], st.latency[5], st.maxLatency.Round(time.Millisecond))
	fmt.Fprintf(&b, "  samples [s: RSS MiB, Go heap MiB, cache entries, goroutines, fds, threads]:")
	for i, smp := range s.samples {
		if i%4 == 0 {
			b.WriteString("\n   ")
		}
		fmt.Fprintf(&b, " [%.0f: %s %s %d %d %d %d]", smp.at.Sub(start.at).Seconds(), mib(smp.rssKiB), mib(smp.heapKiB),
			smp.entries, smp.goroutines, smp.fds, smp.threads)
	}
	m, err := s.scrape()
	if err != nil {
		t.Fatalf("metrics: %v", err)
	}
	for _, family := range []string{"stsmap_discoveries_total", "stsmap_refreshes_total", "stsmap_lookups_total"} {
		fmt.Fprintf(&b, "\n  %s:", family)
		for _, k := range slices.Sorted(func(yield func(string) bool) {
			for k := range m {
				if strings.HasPrefix(k, family+"{") && m[k] > 0 && !yield(k) {
					return
				}
			}
		}) {
			fmt.Fprintf(&b, " %s %.0f", strings.TrimSuffix(k[strings.IndexByte(k, '"')+1:], `"}`), m[k])
		}
	}
	t.Log(b.String())

	s.viol.mu.Lock()
	if s.viol.n > 0 {
		t.Errorf("%d broken invariants; the first:\n  %s", s.viol.n, strings.Join(s.viol.first, "\n  "))
	}
	s.viol.mu.Unlock()
	if st.requests < 100 {
		t.Errorf("only %d requests were answered", st.requests)
	}
	if bad := st.kinds["TEMP"] + st.kinds["TIMEOUT"] + st.kinds["PERM"] + st.kinds["invalid"]; bad > 0 {
		t.Errorf("%d replies were TEMP, TIMEOUT, PERM or not a socketmap reply; remote faults must never defer mail (SPEC 1.3)", bad)
	}
	if limit := 4 * soakFirstContact; st.maxLatency > limit {
		t.Errorf("slowest reply took %v; a lookup waits at most the first-contact timeout for DANE and for discovery (bound %v)", st.maxLatency, limit)
	}
	var lookups float64
	for k, v := range m {
		if strings.HasPrefix(k, "stsmap_lookups_total{") {
			lookups += v
		}
	}
	if got := s.replies.Load(); lookups != float64(got) {
		t.Errorf("the daemon counted %.0f lookups, the clients read %d replies", lookups, got)
	}
	if v := m[`stsmap_lookups_total{answer="temp"}`]; v != 0 {
		t.Errorf("the daemon answered TEMP %.0f times", v)
	}
	// The faults were injected and seen.
	for _, outcome := range []string{"policy", "no_record", "invalid_record", "dns_failure", "invalid_policy",
		"fetch_error_dns", "fetch_error_tls", "fetch_error_timeout", "fetch_error_status", "fetch_error_redirect",
		"fetch_error_content_type", "fetch_error_too_large", "fetch_error_other"} {
		if m[`stsmap_discoveries_total{outcome="`+outcome+`"}`] == 0 {
			t.Errorf("no discovery ended in %s: that fault was not exercised", outcome)
		}
	}
	for _, outcome := range []string{"renewed", "id_changed", "failed"} {
		if m[`stsmap_refreshes_total{outcome="`+outcome+`"}`] == 0 {
			t.Errorf("no refresh ended in %s: refreshes were not exercised", outcome)
		}
	}
	growth := int64(soakRSSGrowth)
	if fixture.RaceEnabled() {
		growth *= 4 // the race detector's shadow memory grows with the heap
	}
	if end.rssKiB*1024 >= start.rssKiB*1024+growth {
		t.Errorf("RSS grew from %s to %s MiB, over the %d MiB bound", mib(start.rssKiB), mib(end.rssKiB), growth>>20)
	}
	if end.goroutines > start.goroutines+soakGoroutineSlop {
		t.Errorf("goroutines: %d at the start, still %d after the load ended (bound %d)", start.goroutines, end.goroutines, start.goroutines+soakGoroutineSlop)
	}
	if end.fds > start.fds+soakFDSlop {
		t.Errorf("open fds: %d at the start, still %d after the load ended (bound %d)", start.fds, end.fds, start.fds+soakFDSlop)
	}
}

// checkAlive: the daemon that started is still running (a dead child
// stays a zombie until waited for, so /proc tells, not a signal 0).
func (s *soak) checkAlive() {
	if _, err := s.sample(); err != nil || s.d.cmd.ProcessState != nil {
		s.t.Fatalf("the daemon crashed or exited during the soak (%v):\n%s", err, soakTail(s.d.logs()))
	}
}

// checkDaemon: the daemon is still running, and its log shows no panic,
// race or error.
func (s *soak) checkDaemon() {
	t := s.t
	s.checkAlive()
	logs := s.d.logs()
	for _, bad := range []string{"panic", "fatal error", "DATA RACE", "level=ERROR"} {
		if i := strings.Index(logs, bad); i >= 0 {
			t.Errorf("daemon log has %q:\n%s", bad, soakClip(logs[max(0, strings.LastIndexByte(logs[:i], '\n')):]))
		}
	}
	t.Logf("daemon log: %d lines, %d warnings", strings.Count(logs, "\n"), strings.Count(logs, "level=WARN"))
}

// stop sends SIGTERM: the daemon must exit 0 (SPEC 8.1).
func (s *soak) stop() {
	t := s.t
	if err := s.d.cmd.Process.Signal(syscall.SIGTERM); err != nil {
		t.Fatal(err)
	}
	exited := make(chan error, 1)
	go func() { exited <- s.d.cmd.Wait() }()
	select {
	case err := <-exited:
		if err != nil {
			t.Errorf("after SIGTERM: %v\n%s", err, soakTail(s.d.logs()))
		}
	case <-time.After(30 * time.Second):
		s.d.cmd.Process.Kill()
		<-exited
		t.Errorf("the daemon did not exit within 30s of SIGTERM:\n%s", soakTail(s.d.logs()))
	}
}

func soakTail(logs string) string {
	lines := strings.Split(strings.TrimSpace(logs), "\n")
	return strings.Join(lines[max(0, len(lines)-30):], "\n")
}

func waitUntil(t *testing.T, timeout time.Duration, what string, cond func() bool) {
	t.Helper()
	if !fixture.Poll(timeout, 100*time.Millisecond, cond) {
		t.Fatalf("no %s after %v", what, timeout)
	}
}

// soakDNS answers in front of the fixture DNS: it drops the queries the
// schedule says, and answers for hostile domains itself.
type soakDNS struct {
	inner  *fixture.DNS
	faults *soakFaults
}

// startSoakDNS serves on a free UDP port and returns its address. The
// front never truncates, so the resolver never retries over TCP.
func startSoakDNS(t *testing.T, inner *fixture.DNS, faults *soakFaults) string {
	pc, err := net.ListenPacket("udp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	started := make(chan struct{})
	srv := &dns.Server{PacketConn: pc, Handler: &soakDNS{inner, faults}, NotifyStartedFunc: func() { close(started) }}
	go srv.ActivateAndServe()
	<-started
	t.Cleanup(func() { srv.Shutdown() })
	return pc.LocalAddr().String()
}

func (f *soakDNS) ServeDNS(w dns.ResponseWriter, req *dns.Msg) {
	if len(req.Question) == 1 {
		name := strings.ToLower(req.Question[0].Name)
		if f.faults.dropped(name) {
			return // the resolver times out
		}
		if h, ok := parseHostile(name); ok {
			f.serveHostile(w, req, h)
			return
		}
	}
	f.inner.ServeDNS(w, req)
}

func (f *soakDNS) serveHostile(w dns.ResponseWriter, req *dns.Msg, h hostileName) {
	q := req.Question[0]
	m := new(dns.Msg)
	m.SetReply(req)
	m.RecursionAvailable = true
	add := func(format string, args ...any) {
		if rr, err := dns.NewRR(fmt.Sprintf(format, args...)); err == nil {
			m.Answer = append(m.Answer, rr)
		}
	}
	switch {
	case h.part == "txt" && q.Qtype == dns.TypeTXT:
		switch h.fault {
		case "servfail":
			m.Rcode = dns.RcodeServerFailure
		case "drop":
			return
		case "twotxt":
			add(`%s 300 IN TXT "v=STSv1; id=1"`, q.Name)
			add(`%s 300 IN TXT "v=STSv1; id=2"`, q.Name)
		case "badtxt":
			add(`%s 300 IN TXT "v=STSv1; id="`, q.Name)
		case "longid":
			add(`%s 300 IN TXT "v=STSv1; id=%s"`, q.Name, strings.Repeat("a", 40))
		case "spf":
			add(`%s 300 IN TXT "v=spf1 -all"`, q.Name)
		case "cnameloop":
			add(`%s 300 IN CNAME %s`, q.Name, q.Name)
		case "cname":
			add(`%s 300 IN CNAME _mta-sts.%s.`, q.Name, soakName("e", 0))
		case "hugetxt":
			rec := "v=STSv1; id=" + h.instance
			for i := range 10 {
				rec += fmt.Sprintf("; x%d=%s", i, strings.Repeat("a", 190))
			}
			var chunks []string
			for len(rec) > 0 {
				n := min(len(rec), 255)
				chunks = append(chunks, `"`+rec[:n]+`"`)
				rec = rec[n:]
			}
			add(`%s 300 IN TXT %s`, q.Name, strings.Join(chunks, " "))
		default:
			add(`%s 300 IN TXT "v=STSv1; id=%s"`, q.Name, h.instance)
		}
	case h.part == "host" && h.fault == "noa":
		m.Rcode = dns.RcodeNameError
	case h.part == "host" && q.Qtype == dns.TypeA:
		if h.fault == "dropa" {
			return
		}
		add(`%s 300 IN A 127.0.0.1`, q.Name)
	}
	// Anything else: NODATA.
	if req.IsEdns0() != nil {
		m.SetEdns0(1232, false)
	}
	w.WriteMsg(m)
}

// soakHTTPS serves hostile policy hosts.
type soakHTTPS struct {
	ca     *fixture.CA
	faults *soakFaults
	self   tls.Certificate

	mu    sync.Mutex
	certs map[string]*tls.Certificate
}

// startSoakHTTPS starts the hostile policy server and returns its address.
func startSoakHTTPS(t *testing.T, ca *fixture.CA, faults *soakFaults) string {
	h := &soakHTTPS{ca: ca, faults: faults, certs: map[string]*tls.Certificate{}, self: fixture.SelfSigned(t, "mta-sts.self."+soakZone)}
	srv := httptest.NewUnstartedServer(h)
	srv.TLS = &tls.Config{GetCertificate: h.certificate}
	srv.Config.ErrorLog = log.New(io.Discard, "", 0)
	srv.StartTLS()
	t.Cleanup(srv.Close)
	return srv.Listener.Addr().String()
}

func (h *soakHTTPS) certificate(hello *tls.ClientHelloInfo) (*tls.Certificate, error) {
	fault := h.faults.httpsFault(hello.ServerName)
	if fault == "selfsigned" {
		return &h.self, nil
	}
	name, notBefore, notAfter := hello.ServerName, time.Now().Add(-time.Hour), time.Now().Add(24*time.Hour)
	switch fault {
	case "wrongcert":
		name = "mta-sts.wrong." + soakZone
	case "expired":
		notBefore, notAfter = time.Now().Add(-48*time.Hour), time.Now().Add(-24*time.Hour)
	}
	key := fault + " " + name
	h.mu.Lock()
	defer h.mu.Unlock()
	if c, ok := h.certs[key]; ok {
		return c, nil
	}
	c, err := h.ca.Leaf(notBefore, notAfter, name)
	if err != nil {
		return nil, err
	}
	h.certs[key] = &c
	return &c, nil
}

func (h *soakHTTPS) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	host := strings.ToLower(r.Host)
	domain := strings.TrimPrefix(host, "mta-sts.")
	body := fixture.PolicyBody("enforce", 86400, "mx."+domain)
	hdr := w.Header()
	hdr.Set("Content-Type", "text/plain")
	rc := http.NewResponseController(w)
	switch h.faults.httpsFault(host) {
	case "status404":
		http.NotFound(w, r)
	case "status500":
		http.Error(w, "oops", http.StatusInternalServerError)
	case "redirect":
		hdr.Set("Location", "https://mta-sts."+soakName("e", 0)+"/.well-known/mta-sts.txt")
		w.WriteHeader(http.StatusMovedPermanently)
	case "ctype":
		hdr.Set("Content-Type", "text/html; charset=utf-8")
		io.WriteString(w, body)
	case "noctype":
		hdr["Content-Type"] = nil // no sniffing either
		io.WriteString(w, body)
	case "big", "bigdeclared":
		big := soakBigPolicy(domain, 70000)
		if h.faults.httpsFault(host) == "bigdeclared" {
			hdr.Set("Content-Length", strconv.Itoa(len(big)))
		} else {
			rc.Flush() // chunked: no declared length
		}
		io.WriteString(w, big)
	case "bigmx":
		io.WriteString(w, soakBigPolicy(domain, 60000))
	case "garbage":
		junk := rand.New(rand.NewPCG(1, 2))
		buf := make([]byte, 500)
		for i := range buf {
			buf[i] = byte(junk.IntN(256))
		}
		w.Write(buf)
	case "nomx":
		io.WriteString(w, "version: STSv1\r\nmode: enforce\r\nmax_age: 86400\r\n")
	case "truncated":
		hdr.Set("Content-Length", "500")
		io.WriteString(w, body[:20])
		rc.Flush()
		panic(http.ErrAbortHandler) // the connection closes mid-body
	case "hugeheader":
		hdr.Set("X-Junk", strings.Repeat("j", 20000))
		io.WriteString(w, body)
	case "trickle", "slow":
		// trickle never finishes (until the client gives up); slow
		// sends the whole policy over 3 s.
		step := 100 * time.Millisecond
		if h.faults.httpsFault(host) == "slow" {
			step = 3 * time.Second / time.Duration(len(body))
		}
		tick := time.NewTicker(step)
		defer tick.Stop()
		w.WriteHeader(http.StatusOK)
		for i := 0; i < 400; i++ {
			select {
			case <-r.Context().Done():
				return
			case <-tick.C:
			}
			if h.faults.httpsFault(host) == "slow" && i == len(body) {
				return
			}
			w.Write([]byte{body[i%len(body)]})
			rc.Flush()
		}
	default:
		io.WriteString(w, body)
	}
}

// soakBigPolicy is a valid enforce policy of at least size bytes.
func soakBigPolicy(domain string, size int) string {
	var b strings.Builder
	b.WriteString("version: STSv1\r\nmode: enforce\r\nmax_age: 86400\r\n")
	for i := 0; b.Len() < size; i++ {
		fmt.Fprintf(&b, "mx: m%d.%s\r\n", i, domain)
	}
	return b.String()
}

// sniRouter is the daemon's one dial target: it reads the TLS ClientHello
// and hands the connection to the backend for its server name, or holds it
// unanswered ("stall"), or closes it ("refused").
type sniRouter struct {
	ln    net.Listener
	route func(sni string) string
	wg    sync.WaitGroup

	mu     sync.Mutex
	conns  map[net.Conn]bool
	closed bool
}

// startSNIRouter listens on a free loopback port and returns its address.
func startSNIRouter(t *testing.T, route func(sni string) string) string {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	r := &sniRouter{ln: ln, route: route, conns: map[net.Conn]bool{}}
	r.wg.Go(r.serve)
	t.Cleanup(r.close)
	return ln.Addr().String()
}

func (r *sniRouter) serve() {
	for {
		c, err := r.ln.Accept()
		if err != nil {
			return
		}
		if !r.track(c) {
			return
		}
		r.wg.Go(func() {
			defer r.untrack(c)
			r.handle(c)
		})
	}
}

func (r *sniRouter) track(c net.Conn) bool {
	r.mu.Lock()
	defer r.mu.Unlock()
	if r.closed {
		c.Close()
		return false
	}
	r.conns[c] = true
	return true
}

func (r *sniRouter) untrack(c net.Conn) {
	c.Close()
	r.mu.Lock()
	defer r.mu.Unlock()
	delete(r.conns, c)
}

func (r *sniRouter) close() {
	r.ln.Close()
	r.mu.Lock()
	r.closed = true
	for c := range r.conns {
		c.Close()
	}
	r.mu.Unlock()
	r.wg.Wait()
}

func (r *sniRouter) handle(c net.Conn) {
	var hello bytes.Buffer
	c.SetReadDeadline(time.Now().Add(10 * time.Second))
	sni := readSNI(io.TeeReader(c, &hello))
	c.SetReadDeadline(time.Time{})
	switch backend := r.route(sni); backend {
	case "stall":
		io.Copy(io.Discard, c) // until the client gives up
	case "refused":
	default:
		b, err := net.Dial("tcp", backend)
		if err != nil || !r.track(b) {
			return
		}
		defer r.untrack(b)
		if _, err := b.Write(hello.Bytes()); err != nil {
			return
		}
		back := make(chan struct{})
		go func() {
			io.Copy(c, b)
			c.(*net.TCPConn).CloseWrite()
			close(back)
		}()
		io.Copy(b, c)
		b.Close()
		<-back
	}
}

var errHelloRead = errors.New("client hello read")

// readSNI reads a TLS ClientHello from r and returns its server name.
func readSNI(r io.Reader) string {
	var sni string
	tls.Server(helloConn{r}, &tls.Config{GetConfigForClient: func(h *tls.ClientHelloInfo) (*tls.Config, error) {
		sni = h.ServerName
		return nil, errHelloRead
	}}).Handshake()
	return sni
}

// helloConn is a read-only net.Conn for readSNI.
type helloConn struct{ r io.Reader }

func (c helloConn) Read(p []byte) (int, error)       { return c.r.Read(p) }
func (c helloConn) Write(p []byte) (int, error)      { return 0, io.ErrClosedPipe }
func (c helloConn) Close() error                     { return nil }
func (c helloConn) LocalAddr() net.Addr              { return &net.TCPAddr{} }
func (c helloConn) RemoteAddr() net.Addr             { return &net.TCPAddr{} }
func (c helloConn) SetDeadline(time.Time) error      { return nil }
func (c helloConn) SetReadDeadline(time.Time) error  { return nil }
func (c helloConn) SetWriteDeadline(time.Time) error { return nil }
