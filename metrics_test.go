package main

import (
	"bufio"
	"io"
	"net"
	"net/http"
	"strings"
	"testing"
	"time"
)

// The daemon's metrics listener: /healthz once serving, and /metrics with
// the lookups just made.
func TestServeMetrics(t *testing.T) {
	w := newTestWorld(t)
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	metricsAddr := l.Addr().String()
	l.Close()
	cfg := testConfig(w, "127.0.0.1:0")
	cfg.Metrics.Listen = metricsAddr
	addrs := startServe(t, cfg, testEnv(w))
	c, err := net.Dial("tcp", addrs[0].String())
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	r := bufio.NewReader(c)
	for _, req := range []string{"postfix example.com", "postfix example.com", "postfix nxdomain.example", "postfix .example.com"} {
		exchange(t, c, r, req)
	}
	get := func(path string) (int, string) {
		t.Helper()
		deadline := time.Now().Add(10 * time.Second)
		for {
			resp, err := http.Get("http://" + metricsAddr + path)
			if err == nil {
				defer resp.Body.Close()
				b, _ := io.ReadAll(resp.Body)
				return resp.StatusCode, string(b)
			}
			if time.Now().After(deadline) {
				t.Fatalf("GET %s: %v", path, err)
			}
			time.Sleep(20 * time.Millisecond)
		}
	}
	if code, _ := get("/healthz"); code != http.StatusOK {
		t.Errorf("/healthz: got %d, want 200", code)
	}
	_, body := get("/metrics")
	for _, want := range []string{
		`stsmap_lookups_total{answer="enforce"} 2`,
		`stsmap_lookups_total{answer="no_policy"} 2`,
		`stsmap_cache_hits_total 1`,
		`stsmap_discoveries_total{outcome="policy"} 1`,
		`stsmap_discoveries_total{outcome="no_record"} 1`,
		`stsmap_policies{mode="enforce"} 1`,
		`stsmap_socketmap_connections 1`,
	} {
		if !strings.Contains(body, want+"\n") {
			t.Errorf("/metrics lacks %q", want)
		}
	}
}
