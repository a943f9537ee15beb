package main

import (
	"bufio"
	"context"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"slices"
	"strconv"
	"strings"
	"time"

	"github.com/miekg/dns"

	"stsmap/socketmap"
)

// What a bare round trip fetches (RFC 8461 §3.1, §3.3).
const (
	policyPath    = "/.well-known/mta-sts.txt"
	maxPolicySize = 64 << 10
)

// coldConfig configures -cold: first-contact lookups of stsmap against the
// bare round trips of a discovery, done by this tool.
type coldConfig struct {
	addr    string
	mapName string
	// stsmapKeys are asked of stsmap, bareKeys fetched directly; both
	// must be domains nobody has looked up yet, and disjoint.
	stsmapKeys, bareKeys []string
	dnsAddr              string // the DNS server the bare round trips ask
	httpsPort            int
	// bareAsStsmap makes the bare round trips ask every DNS question a
	// first contact of stsmap asks, in the same pairs at once: TXT with
	// MX (the DANE check), then A with AAAA (the policy host).
	bareAsStsmap bool
	roots        *x509.CertPool
	timeout      time.Duration
	// expect is the reply word stsmap must give; "" accepts any.
	expect     socketmap.Word
	maxErrShow int
}

// bareSteps is how long each step of a bare round trip took.
type bareSteps struct {
	TXT  time.Duration // DNS TXT _mta-sts.<domain>
	A    time.Duration // DNS A mta-sts.<domain>
	TLS  time.Duration // TCP connect and TLS handshake
	HTTP time.Duration // GET the policy, read the body
}

// durStats summarises a sample of durations.
type durStats struct {
	N                             int
	P50, P90, P99, Mean, Min, Max time.Duration
}

func summarize(d []time.Duration) durStats {
	s := durStats{N: len(d)}
	if len(d) == 0 {
		return s
	}
	sorted := slices.Sorted(slices.Values(d))
	var sum time.Duration
	for _, x := range d {
		sum += x
	}
	s.P50, s.P90, s.P99 = percentile(sorted, 50), percentile(sorted, 90), percentile(sorted, 99)
	s.Mean, s.Min, s.Max = sum/time.Duration(len(d)), sorted[0], sorted[len(sorted)-1]
	return s
}

type statsJSON struct {
	N    int     `json:"n"`
	P50  float64 `json:"p50"`
	P90  float64 `json:"p90"`
	P99  float64 `json:"p99"`
	Mean float64 `json:"mean"`
	Min  float64 `json:"min"`
	Max  float64 `json:"max"`
}

func (s durStats) json() statsJSON {
	us := func(d time.Duration) float64 { return float64(d) / float64(time.Microsecond) }
	return statsJSON{s.N, us(s.P50), us(s.P90), us(s.P99), us(s.Mean), us(s.Min), us(s.Max)}
}

// coldResult is what -cold measured.
type coldResult struct {
	Pairs       int                `json:"pairs"`
	StsmapUs    statsJSON          `json:"stsmap_us"`
	BareUs      statsJSON          `json:"bare_us"`
	BareStepsUs map[string]float64 `json:"bare_steps_mean_us"`
	Ratio       map[string]float64 `json:"ratio_stsmap_to_bare"`
	Replies     map[string]int64   `json:"stsmap_replies"`
	Errors      int64              `json:"errors"`
	FirstErrs   []string           `json:"first_errors,omitempty"`

	stsmap, bare durStats
	steps        bareSteps // means
	words        wordCounts
}

// ratio returns a/b, or 0 when b is 0.
func ratio(a, b time.Duration) float64 {
	if b == 0 {
		return 0
	}
	return float64(a) / float64(b)
}

// runCold times, one at a time, a first-contact lookup of each stsmap key
// and a bare discovery of each bare key, alternating which of the two goes
// first so that drift (other load on the machine, growing tables) weighs on
// both alike.
func runCold(ctx context.Context, cfg coldConfig) coldResult {
	pairs := min(len(cfg.stsmapKeys), len(cfg.bareKeys))
	errs := errSink{max: cfg.maxErrShow}
	var (
		sm, bare []time.Duration
		steps    []bareSteps
		words    wordCounts
	)
	client := &coldClient{cfg: cfg}
	defer client.close()
	for i := range pairs {
		stsmapStep := func() {
			d, p, err := client.lookup(cfg.stsmapKeys[i])
			if err != nil {
				errs.add(0, fmt.Errorf("stsmap %s: %w", cfg.stsmapKeys[i], err))
				return
			}
			words.add(p)
			word, _, _ := strings.Cut(string(p), " ")
			if cfg.expect != "" && word != string(cfg.expect) {
				errs.add(0, fmt.Errorf("stsmap %s: reply %q, want %s", cfg.stsmapKeys[i], trunc(p), cfg.expect))
				return
			}
			sm = append(sm, d)
		}
		bareStep := func() {
			rctx, cancel := context.WithTimeout(ctx, cfg.timeout)
			defer cancel()
			s, err := bareRoundTrip(rctx, cfg, cfg.bareKeys[i])
			if err != nil {
				errs.add(1, fmt.Errorf("bare %s: %w", cfg.bareKeys[i], err))
				return
			}
			steps = append(steps, s)
			bare = append(bare, s.TXT+s.A+s.TLS+s.HTTP)
		}
		if i%2 == 0 {
			stsmapStep()
			bareStep()
		} else {
			bareStep()
			stsmapStep()
		}
		if ctx.Err() != nil {
			break
		}
	}
	res := coldResult{
		Pairs: pairs, Errors: errs.n.Load(), FirstErrs: errs.msgs,
		stsmap: summarize(sm), bare: summarize(bare), words: words,
	}
	for _, s := range steps {
		res.steps.TXT += s.TXT
		res.steps.A += s.A
		res.steps.TLS += s.TLS
		res.steps.HTTP += s.HTTP
	}
	if n := time.Duration(len(steps)); n > 0 {
		res.steps = bareSteps{res.steps.TXT / n, res.steps.A / n, res.steps.TLS / n, res.steps.HTTP / n}
	}
	us := func(d time.Duration) float64 { return float64(d) / float64(time.Microsecond) }
	res.StsmapUs, res.BareUs, res.Replies = res.stsmap.json(), res.bare.json(), words.asMap()
	res.BareStepsUs = map[string]float64{"txt": us(res.steps.TXT), "a": us(res.steps.A), "tls": us(res.steps.TLS), "http": us(res.steps.HTTP)}
	res.Ratio = map[string]float64{
		"p50":  ratio(res.stsmap.P50, res.bare.P50),
		"p90":  ratio(res.stsmap.P90, res.bare.P90),
		"mean": ratio(res.stsmap.Mean, res.bare.Mean),
	}
	return res
}

// coldClient asks stsmap one key at a time over one connection, as a
// Postfix process does; a failed connection is dialled again for the next
// key.
type coldClient struct {
	cfg coldConfig
	c   net.Conn
	dec *socketmap.Decoder
}

// lookup returns how long stsmap took to answer key, and the reply.
func (cc *coldClient) lookup(key string) (time.Duration, []byte, error) {
	if cc.c == nil {
		netw, a := network(cc.cfg.addr)
		c, err := net.DialTimeout(netw, a, cc.cfg.timeout)
		if err != nil {
			return 0, nil, err
		}
		cc.c, cc.dec = c, socketmap.NewDecoder(bufio.NewReader(c), maxReply)
	}
	wire := socketmap.AppendNetstring(nil, []byte(cc.cfg.mapName+" "+key))
	start := time.Now()
	cc.c.SetDeadline(start.Add(cc.cfg.timeout))
	_, err := cc.c.Write(wire)
	var p []byte
	if err == nil {
		p, err = cc.dec.Next()
	}
	d := time.Since(start)
	if err != nil {
		cc.close()
		return 0, nil, err
	}
	return d, p, nil
}

func (cc *coldClient) close() {
	if cc.c != nil {
		cc.c.Close()
		cc.c = nil
	}
}

// bareRoundTrip does what a discovery of domain needs at the least, each
// step on a fresh socket as a first contact has: DNS TXT _mta-sts.<domain>
// and A mta-sts.<domain> from cfg.dnsAddr, a TCP connection to that address
// on cfg.httpsPort with a TLS handshake verified for the policy host, and
// an HTTP GET of the policy (RFC 8461 §3.1, §3.3).
func bareRoundTrip(ctx context.Context, cfg coldConfig, domain string) (bareSteps, error) {
	var s bareSteps
	start := time.Now()
	txt, err := dnsQueryWith(ctx, cfg, "_mta-sts."+domain, dns.TypeTXT, domain, dns.TypeMX)
	if err != nil {
		return s, err
	}
	if !slices.ContainsFunc(txt, func(rr dns.RR) bool {
		t, ok := rr.(*dns.TXT)
		return ok && strings.HasPrefix(strings.Join(t.Txt, ""), "v=STSv1")
	}) {
		return s, fmt.Errorf("_mta-sts.%s: no v=STSv1 TXT record", domain)
	}
	t1 := time.Now()
	s.TXT = t1.Sub(start)

	host := "mta-sts." + domain
	as, err := dnsQueryWith(ctx, cfg, host, dns.TypeA, host, dns.TypeAAAA)
	if err != nil {
		return s, err
	}
	var ip net.IP
	for _, rr := range as {
		if a, ok := rr.(*dns.A); ok {
			ip = a.A
			break
		}
	}
	if ip == nil {
		return s, fmt.Errorf("%s: no A record", host)
	}
	t2 := time.Now()
	s.A = t2.Sub(t1)

	var d net.Dialer
	conn, err := d.DialContext(ctx, "tcp", net.JoinHostPort(ip.String(), strconv.Itoa(cfg.httpsPort)))
	if err != nil {
		return s, err
	}
	defer conn.Close()
	if dl, ok := ctx.Deadline(); ok {
		conn.SetDeadline(dl)
	}
	tc := tls.Client(conn, &tls.Config{ServerName: host, RootCAs: cfg.roots, MinVersion: tls.VersionTLS12})
	if err := tc.HandshakeContext(ctx); err != nil {
		return s, fmt.Errorf("%s: %w", host, err)
	}
	t3 := time.Now()
	s.TLS = t3.Sub(t2)

	if _, err := io.WriteString(tc, "GET "+policyPath+" HTTP/1.1\r\nHost: "+host+"\r\nConnection: close\r\n\r\n"); err != nil {
		return s, err
	}
	resp, err := http.ReadResponse(bufio.NewReader(tc), nil)
	if err != nil {
		return s, fmt.Errorf("%s: %w", host, err)
	}
	body, err := io.ReadAll(io.LimitReader(resp.Body, maxPolicySize+1))
	resp.Body.Close()
	if err != nil {
		return s, fmt.Errorf("%s: reading the policy: %w", host, err)
	}
	s.HTTP = time.Since(t3)
	switch {
	case resp.StatusCode != http.StatusOK:
		return s, fmt.Errorf("%s: status %d", host, resp.StatusCode)
	case len(body) > maxPolicySize:
		return s, fmt.Errorf("%s: policy larger than %d bytes", host, maxPolicySize)
	case !strings.HasPrefix(string(body), "version: STSv1"):
		return s, fmt.Errorf("%s: not a policy: %q", host, trunc(body))
	}
	return s, nil
}

// dnsQueryWith is dnsQuery of name and qtype; with cfg.bareAsStsmap it asks
// also, at the same time, for also's alsoType RRs, and waits for both (the
// second answer is not used).
func dnsQueryWith(ctx context.Context, cfg coldConfig, name string, qtype uint16, also string, alsoType uint16) ([]dns.RR, error) {
	if !cfg.bareAsStsmap {
		return dnsQuery(ctx, cfg, name, qtype)
	}
	done := make(chan error, 1)
	go func() {
		_, err := dnsQuery(ctx, cfg, also, alsoType)
		done <- err
	}()
	rrs, err := dnsQuery(ctx, cfg, name, qtype)
	if err2 := <-done; err == nil && err2 != nil {
		err = err2
	}
	return rrs, err
}

// dnsQuery asks cfg.dnsAddr for name's qtype RRs over a fresh UDP socket,
// with EDNS0 and the DO bit as stsmap's queries are; an answer without
// them is an error.
func dnsQuery(ctx context.Context, cfg coldConfig, name string, qtype uint16) ([]dns.RR, error) {
	m := new(dns.Msg)
	m.SetQuestion(dns.Fqdn(name), qtype)
	m.SetEdns0(1232, true)
	c := dns.Client{Net: "udp", Timeout: cfg.timeout}
	r, _, err := c.ExchangeContext(ctx, m, cfg.dnsAddr)
	if err != nil {
		return nil, fmt.Errorf("%s %s: %w", name, dns.TypeToString[qtype], err)
	}
	if r.Rcode != dns.RcodeSuccess {
		return nil, fmt.Errorf("%s %s: %s", name, dns.TypeToString[qtype], dns.RcodeToString[r.Rcode])
	}
	if len(r.Answer) == 0 {
		return nil, errors.New(name + " " + dns.TypeToString[qtype] + ": no answer")
	}
	return r.Answer, nil
}

func printCold(w io.Writer, r coldResult) {
	line := func(name string, s durStats) {
		fmt.Fprintf(w, "%-12s n %d  p50 %v  p90 %v  p99 %v  mean %v  min %v  max %v\n",
			name, s.N, s.P50, s.P90, s.P99, s.Mean, s.Min, s.Max)
	}
	fmt.Fprintf(w, "cold         %d pairs, one lookup at a time, stsmap and bare alternating\n", r.Pairs)
	line("stsmap", r.stsmap)
	fmt.Fprintf(w, "  replies    %s\n", r.words)
	line("bare", r.bare)
	fmt.Fprintf(w, "  steps      mean TXT %v  A %v  connect+TLS %v  HTTP %v\n", r.steps.TXT, r.steps.A, r.steps.TLS, r.steps.HTTP)
	fmt.Fprintf(w, "ratio        stsmap/bare  p50 %.2f  p90 %.2f  mean %.2f\n", r.Ratio["p50"], r.Ratio["p90"], r.Ratio["mean"])
	fmt.Fprintf(w, "errors       %d\n", r.Errors)
	for _, e := range r.FirstErrs {
		fmt.Fprintf(w, "error: %s\n", e)
	}
}
