package metrics

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/http/httptest"
	"strings"
	"sync"
	"testing"
	"time"

	dto "github.com/prometheus/client_model/go"
	"github.com/prometheus/common/expfmt"
	"github.com/prometheus/common/model"

	"stsmap/dane"
	"stsmap/internal/fixture"
	"stsmap/policycache"
	"stsmap/policymap"
	"stsmap/resolver"
	"stsmap/socketmap"
)

// fakeDomain is what fakeSource answers for one domain.
type fakeDomain struct {
	recordErr error
	policy    *resolver.Policy
	fetchErr  error
}

// fakeSource answers discoveries from a fixed table; a domain not in it has
// no record.
type fakeSource map[string]fakeDomain

func (f fakeSource) LookupRecord(ctx context.Context, domain string) (resolver.Record, error) {
	d, ok := f[domain]
	if !ok {
		return resolver.Record{}, fmt.Errorf("%s: %w", domain, resolver.ErrNoRecord)
	}
	return resolver.Record{ID: "id1"}, d.recordErr
}

func (f fakeSource) FetchPolicy(ctx context.Context, domain string) (*resolver.Policy, error) {
	d := f[domain]
	return d.policy, d.fetchErr
}

// fakeDANE answers a fixed level per next hop, dane.None for the others,
// and answers every level from its cache, as dane.Checker does once a
// domain is known: the handler then begins no MTA-STS lookup alongside a
// DANE check (policycache.Cache.Begin), which would add a discovery of each
// DANE domain to the counts this test checks.
type fakeDANE map[string]dane.Level

func (f fakeDANE) Check(ctx context.Context, nexthop string, port int, host bool) (dane.Level, error) {
	if f[nexthop] == dane.Temp {
		return dane.Temp, dane.ErrTLSALookup
	}
	return f[nexthop], nil
}

func (f fakeDANE) Cached(nexthop string, port int, host bool) (dane.Level, bool, error) {
	lvl, err := f.Check(context.Background(), nexthop, port, host)
	return lvl, true, err
}

func policyOf(mode resolver.Mode) *resolver.Policy {
	return &resolver.Policy{Mode: mode, MaxAge: 24 * time.Hour, MX: []string{"mx.example.net"}}
}

// newStack wires a real cache and handler to m, as main does.
func newStack(t *testing.T, m **Metrics, cfg policycache.Config) (*policycache.Cache, *policymap.Handler) {
	t.Helper()
	src := fakeSource{
		"enforce.example":   {policy: policyOf(resolver.ModeEnforce)},
		"testing.example":   {policy: policyOf(resolver.ModeTesting)},
		"none.example":      {policy: policyOf(resolver.ModeNone)},
		"fetcherr.example":  {fetchErr: fmt.Errorf("connection refused: %w", resolver.ErrFetch)},
		"badpolicy.example": {fetchErr: fmt.Errorf("bad max_age: %w", resolver.ErrInvalidPolicy)},
		"servfail.example":  {recordErr: fmt.Errorf("SERVFAIL: %w", resolver.ErrDNS)},
	}
	var cache *policycache.Cache
	*m = New(func() policycache.Stats { return cache.Stats() })
	cfg.Observer = *m
	cfg.Logger = fixture.QuietLogger()
	if cfg.NegativeTTL == 0 {
		cfg.NegativeTTL = 15 * time.Minute
	}
	cache = policycache.New(src, cfg)
	t.Cleanup(cache.Close)
	h := &policymap.Handler{
		Cache:    cache,
		Settings: func(string) policymap.Settings { return policymap.Settings{} },
		DANE:     fakeDANE{"dane.example": dane.Dane, "daneonly.example": dane.DaneOnly, "danetemp.example": dane.Temp},
		Logger:   fixture.QuietLogger(),
		Observe:  (*m).ObserveLookup,
	}
	return cache, h
}

// scrape GETs /metrics from h and parses the exposition text.
func scrape(t *testing.T, h http.Handler) map[string]*dto.MetricFamily {
	t.Helper()
	rec := httptest.NewRecorder()
	h.ServeHTTP(rec, httptest.NewRequest(http.MethodGet, "/metrics", nil))
	if rec.Code != http.StatusOK {
		t.Fatalf("GET /metrics: got status %d, want 200; body:\n%s", rec.Code, rec.Body)
	}
	p := expfmt.NewTextParser(model.UTF8Validation)
	fams, err := p.TextToMetricFamilies(rec.Body)
	if err != nil {
		t.Fatalf("GET /metrics: parsing the exposition text: %v", err)
	}
	return fams
}

// value returns the value of the series of name with exactly the labels
// given as name, value pairs; a histogram's value is its count.
func value(t *testing.T, fams map[string]*dto.MetricFamily, name string, labels ...string) float64 {
	t.Helper()
	f, ok := fams[name]
	if !ok {
		t.Fatalf("%s: not in the scrape", name)
	}
	want := map[string]string{}
	for i := 0; i+1 < len(labels); i += 2 {
		want[labels[i]] = labels[i+1]
	}
next:
	for _, m := range f.GetMetric() {
		if len(m.GetLabel()) != len(want) {
			continue
		}
		for _, l := range m.GetLabel() {
			if v, ok := want[l.GetName()]; !ok || v != l.GetValue() {
				continue next
			}
		}
		switch {
		case m.Counter != nil:
			return m.Counter.GetValue()
		case m.Gauge != nil:
			return m.Gauge.GetValue()
		case m.Histogram != nil:
			return float64(m.Histogram.GetSampleCount())
		}
		t.Fatalf("%s%v: unexpected type %v", name, labels, f.GetType())
	}
	t.Fatalf("%s%v: no such series", name, labels)
	return 0
}

type series struct {
	name   string
	labels []string
	want   float64
}

func checkSeries(t *testing.T, fams map[string]*dto.MetricFamily, want []series) {
	t.Helper()
	for _, s := range want {
		if got := value(t, fams, s.name, s.labels...); got != s.want {
			t.Errorf("%s%v: got %v, want %v", s.name, s.labels, got, s.want)
		}
	}
}

// After scripted lookups, the scraped /metrics counts each lookup by answer,
// each cache hit and miss, each discovery by outcome, and the cached
// policies by mode.
func TestScrapeAfterLookups(t *testing.T) {
	var m *Metrics
	_, h := newStack(t, &m, policycache.Config{})
	script := []struct{ key, want string }{
		{"enforce.example", "OK secure match=mx.example.net"},
		{"enforce.example", "OK secure match=mx.example.net"}, // a cache hit
		{"norecord.example", "NOTFOUND "},
		{"fetcherr.example", "NOTFOUND "},
		{"badpolicy.example", "NOTFOUND "},
		{"servfail.example", "NOTFOUND "},
		{"testing.example", "NOTFOUND "},
		{"none.example", "NOTFOUND "},
		{".example.com", "NOTFOUND "}, // a parent-domain lookup: skipped, no cache lookup
		{"dane.example", "OK dane"},
		{"daneonly.example", "OK dane-only"},
		{"danetemp.example", "TEMP DANE TLSA lookup failed"},
	}
	for _, s := range script {
		r := h.ServeSocketmap(t.Context(), "postfix", s.key)
		if got := string(socketmap.AppendReply(nil, r)); !strings.HasSuffix(got, ":"+s.want+",") {
			t.Fatalf("lookup %q: got reply %q, want %q", s.key, got, s.want)
		}
	}

	fams := scrape(t, m.Handler(nil))
	checkSeries(t, fams, []series{
		{"stsmap_lookups_total", []string{"answer", "enforce"}, 2},
		{"stsmap_lookups_total", []string{"answer", "testing"}, 0}, // testing is NOTFOUND without strict testing
		{"stsmap_lookups_total", []string{"answer", "none"}, 1},
		{"stsmap_lookups_total", []string{"answer", "no_policy"}, 6},
		{"stsmap_lookups_total", []string{"answer", "dane"}, 1},
		{"stsmap_lookups_total", []string{"answer", "dane-only"}, 1},
		{"stsmap_lookups_total", []string{"answer", "temp"}, 1},
		{"stsmap_lookup_duration_seconds", nil, float64(len(script))},
		{"stsmap_cache_hits_total", nil, 1},
		{"stsmap_cache_misses_total", nil, 7},
		{"stsmap_discoveries_total", []string{"outcome", "policy"}, 3},
		{"stsmap_discoveries_total", []string{"outcome", "no_record"}, 1},
		{"stsmap_discoveries_total", []string{"outcome", "invalid_record"}, 0},
		{"stsmap_discoveries_total", []string{"outcome", "dns_failure"}, 1},
		{"stsmap_discoveries_total", []string{"outcome", "fetch_error_other"}, 1},
		{"stsmap_discoveries_total", []string{"outcome", "fetch_error_tls"}, 0},
		{"stsmap_discoveries_total", []string{"outcome", "invalid_policy"}, 1},
		{"stsmap_refreshes_total", []string{"outcome", "renewed"}, 0},
		{"stsmap_policy_id_changes_total", nil, 0},
		{"stsmap_refresh_failures_total", nil, 0},
		{"stsmap_store_errors_total", []string{"op", "put"}, 0},
		{"stsmap_policies", []string{"mode", "enforce"}, 1},
		{"stsmap_policies", []string{"mode", "testing"}, 1},
		{"stsmap_policies", []string{"mode", "none"}, 1},
		{"stsmap_negative_entries", nil, 4},
		{"stsmap_cache_entries", nil, 7},
		{"stsmap_policies_refresh_failing_over_a_day", nil, 0},
		{"stsmap_socketmap_connections", nil, 0},
	})
	for _, name := range []string{"go_goroutines", "process_cpu_seconds_total"} {
		if _, ok := fams[name]; !ok {
			t.Errorf("%s: missing; want the Go and process collectors", name)
		}
	}
}

// Label values outside the fixed sets are counted as "other": a caller
// cannot add series.
func TestUnknownLabelValuesCountAsOther(t *testing.T) {
	m := New(nil)
	m.ObserveLookup("OK secure match=evil", time.Millisecond)
	m.Discovery("fetch_error_something new")
	m.Refresh("?")
	m.StoreError("scan")
	fams := scrape(t, m.Handler(nil))
	checkSeries(t, fams, []series{
		{"stsmap_lookups_total", []string{"answer", "other"}, 1},
		{"stsmap_discoveries_total", []string{"outcome", "other"}, 1},
		{"stsmap_refreshes_total", []string{"outcome", "other"}, 1},
		{"stsmap_store_errors_total", []string{"op", "other"}, 1},
	})
	for _, f := range []string{"stsmap_lookups_total", "stsmap_discoveries_total", "stsmap_refreshes_total", "stsmap_store_errors_total"} {
		for _, s := range fams[f].GetMetric() {
			for _, l := range s.GetLabel() {
				if strings.ContainsAny(l.GetValue(), " ?") {
					t.Errorf("%s: series with label %s=%q", f, l.GetName(), l.GetValue())
				}
			}
		}
	}
}

// The hooks on the lookup path do not allocate.
func TestHotPathDoesNotAllocate(t *testing.T) {
	m := New(nil)
	got := testing.AllocsPerRun(100, func() {
		m.CacheHit()
		m.ObserveLookup(policymap.AnswerEnforce, 30*time.Microsecond)
	})
	if got != 0 {
		t.Errorf("CacheHit and ObserveLookup: got %v allocations, want 0", got)
	}
}

// Refresh outcomes feed the id-change and failure counters too.
func TestRefreshCounters(t *testing.T) {
	m := New(nil)
	for _, o := range []string{policycache.RefreshRenewed, policycache.RefreshRenewed, policycache.RefreshIDChanged,
		policycache.RefreshFailed, policycache.RefreshFailed, policycache.RefreshFailed, policycache.RefreshDroppedIdle} {
		m.Refresh(o)
	}
	m.StoreError(policycache.StoreOpPut)
	checkSeries(t, scrape(t, m.Handler(nil)), []series{
		{"stsmap_refreshes_total", []string{"outcome", "renewed"}, 2},
		{"stsmap_refreshes_total", []string{"outcome", "id_changed"}, 1},
		{"stsmap_refreshes_total", []string{"outcome", "failed"}, 3},
		{"stsmap_refreshes_total", []string{"outcome", "dropped_idle"}, 1},
		{"stsmap_policy_id_changes_total", nil, 1},
		{"stsmap_refresh_failures_total", nil, 3},
		{"stsmap_store_errors_total", []string{"op", "put"}, 1},
		{"stsmap_store_errors_total", []string{"op", "get"}, 0},
	})
}

// RFC 8461 §10.2: a policy whose refresh has failed for more than a day
// shows in the gauge the alert rule watches; a restart keeps it (the store
// keeps FailingSince).
func TestRefreshFailingOverADayGauge(t *testing.T) {
	now := time.Date(2026, 3, 1, 12, 0, 0, 0, time.UTC)
	store := &fixedStore{entries: []*policycache.Entry{
		storedEntry("failing.example", resolver.ModeEnforce, now, 25*time.Hour), // the alarm
		storedEntry("recent.example", resolver.ModeEnforce, now, 23*time.Hour),  // not yet
		storedEntry("none.example", resolver.ModeNone, now, 72*time.Hour),       // mode none: no alarm
		storedEntry("fine.example", resolver.ModeTesting, now, 0),               // not failing
	}}
	var m *Metrics
	cache, _ := newStack(t, &m, policycache.Config{Store: store, Now: func() time.Time { return now }})
	if _, err := cache.LoadStore(t.Context()); err != nil {
		t.Fatal(err)
	}
	checkSeries(t, scrape(t, m.Handler(nil)), []series{
		{"stsmap_policies_refresh_failing_over_a_day", nil, 1},
		{"stsmap_policies", []string{"mode", "enforce"}, 2},
		{"stsmap_policies", []string{"mode", "testing"}, 1},
		{"stsmap_policies", []string{"mode", "none"}, 1},
		{"stsmap_store_errors_total", []string{"op", "load"}, 0},
	})

	store.err = errors.New("disk on fire")
	if _, err := cache.LoadStore(t.Context()); err == nil {
		t.Fatal("LoadStore: got no error from a failing store")
	}
	checkSeries(t, scrape(t, m.Handler(nil)), []series{{"stsmap_store_errors_total", []string{"op", "load"}, 1}})
}

// storedEntry is a stored policy whose refreshes have failed for failing
// (zero: not failing) at now.
func storedEntry(domain string, mode resolver.Mode, now time.Time, failing time.Duration) *policycache.Entry {
	e := &policycache.Entry{Domain: domain, ID: "id1", Reason: policycache.ReasonPolicy, Policy: policyOf(mode),
		Fetched: now.Add(-72 * time.Hour), Expires: now.Add(96 * time.Hour)}
	if failing > 0 {
		e.FailedAt, e.FailingSince = now.Add(-time.Minute), now.Add(-failing)
	}
	return e
}

// fixedStore is a policycache.Store that loads a fixed list of entries, or
// fails with err.
type fixedStore struct {
	entries []*policycache.Entry
	err     error
}

func (s *fixedStore) Load(ctx context.Context, now time.Time, fn func(*policycache.Entry)) error {
	if s.err != nil {
		return s.err
	}
	for _, e := range s.entries {
		fn(e)
	}
	return nil
}

func (s *fixedStore) Get(ctx context.Context, domain string) (*policycache.Entry, error) {
	return nil, s.err
}
func (s *fixedStore) Put(ctx context.Context, e *policycache.Entry) error { return s.err }
func (s *fixedStore) Delete(ctx context.Context, domain string) error     { return s.err }
func (s *fixedStore) Claim(ctx context.Context, domain string, period time.Duration) (bool, error) {
	return true, s.err
}
func (s *fixedStore) Close() error { return nil }

// The connection gauge is 1 while a Postfix client is connected to a real
// socketmap server, 0 after it hangs up; the counter keeps the total.
func TestSocketmapConnectionGauge(t *testing.T) {
	var m *Metrics
	_, h := newStack(t, &m, policycache.Config{})
	ended := make(chan struct{}, 1)
	srv := &socketmap.Server{Handler: h, Logger: fixture.QuietLogger(), ConnState: func(delta int) {
		m.ConnState(delta)
		if delta < 0 {
			ended <- struct{}{}
		}
	}}
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	served := make(chan error, 1)
	go func() { served <- srv.Serve(ln) }()
	t.Cleanup(func() {
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		srv.Shutdown(ctx)
		if err := <-served; !errors.Is(err, socketmap.ErrServerClosed) {
			t.Errorf("Serve: got %v, want ErrServerClosed", err)
		}
	})

	client, err := net.Dial("tcp", ln.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	client.SetDeadline(time.Now().Add(10 * time.Second))
	// One request answered: the server has accepted and counted the
	// connection.
	req := "postfix enforce.example"
	fmt.Fprintf(client, "%d:%s,", len(req), req)
	reply, err := bufio.NewReader(client).ReadString(',')
	if want := "30:OK secure match=mx.example.net,"; err != nil || reply != want {
		t.Fatalf("reply: got %q, %v; want %q", reply, err, want)
	}
	handler := m.Handler(nil)
	checkSeries(t, scrape(t, handler), []series{
		{"stsmap_socketmap_connections", nil, 1},
		{"stsmap_socketmap_connections_total", nil, 1},
	})

	client.Close()
	select {
	case <-ended:
	case <-time.After(10 * time.Second):
		t.Fatal("the server did not end the connection within 10s of the client hanging up")
	}
	checkSeries(t, scrape(t, handler), []series{
		{"stsmap_socketmap_connections", nil, 0},
		{"stsmap_socketmap_connections_total", nil, 1},
		{"stsmap_lookups_total", []string{"answer", "enforce"}, 1},
	})
}

// /healthz answers 503 until ready, 200 after; /metrics is served meanwhile.
func TestHealthz(t *testing.T) {
	var mu sync.Mutex
	ready := false
	h := New(nil).Handler(func() bool {
		mu.Lock()
		defer mu.Unlock()
		return ready
	})
	get := func(path string) (int, string) {
		t.Helper()
		rec := httptest.NewRecorder()
		h.ServeHTTP(rec, httptest.NewRequest(http.MethodGet, path, nil))
		return rec.Code, rec.Body.String()
	}
	if code, body := get("/healthz"); code != http.StatusServiceUnavailable || body != "starting\n" {
		t.Errorf("before ready: got %d %q, want 503 \"starting\\n\"", code, body)
	}
	if code, _ := get("/metrics"); code != http.StatusOK {
		t.Errorf("/metrics before ready: got %d, want 200", code)
	}
	mu.Lock()
	ready = true
	mu.Unlock()
	if code, body := get("/healthz"); code != http.StatusOK || body != "ok\n" {
		t.Errorf("after ready: got %d %q, want 200 \"ok\\n\"", code, body)
	}
	if code, _ := get("/"); code != http.StatusNotFound {
		t.Errorf("/: got %d, want 404", code)
	}
	rec := httptest.NewRecorder()
	h.ServeHTTP(rec, httptest.NewRequest(http.MethodPost, "/healthz", nil))
	if rec.Code != http.StatusMethodNotAllowed {
		t.Errorf("POST /healthz: got %d, want 405", rec.Code)
	}
}

// Serve serves on a real listener until its context ends, then returns nil
// and closes the listener.
func TestServe(t *testing.T) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(t.Context())
	done := make(chan error, 1)
	go func() { done <- serve(ctx, ln, New(nil).Handler(nil), fixture.QuietLogger()) }()

	resp, err := http.Get("http://" + ln.Addr().String() + "/healthz")
	if err != nil {
		t.Fatal(err)
	}
	body, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	if resp.StatusCode != http.StatusOK || string(body) != "ok\n" {
		t.Errorf("GET /healthz: got %d %q, want 200 \"ok\\n\"", resp.StatusCode, body)
	}
	http.DefaultClient.CloseIdleConnections()

	cancel()
	select {
	case err := <-done:
		if err != nil {
			t.Errorf("Serve after cancel: got %v, want nil", err)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("Serve did not return within 10s of its context ending")
	}
	if c, err := net.Dial("tcp", ln.Addr().String()); err == nil {
		c.Close()
		t.Error("the listener still accepts after Serve returned")
	}
}

// Serve returns the error of a listen that fails.
func TestServeListenError(t *testing.T) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	if err := Serve(t.Context(), ln.Addr().String(), http.NotFoundHandler(), fixture.QuietLogger()); err == nil {
		t.Error("Serve on an address in use: got nil, want an error")
	}
}
