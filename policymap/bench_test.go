package policymap

import (
	"context"
	"io"
	"log/slog"
	"net"
	"strconv"
	"testing"
	"time"

	"stsmap/dane"
	"stsmap/policycache"
	"stsmap/resolver"
	"stsmap/socketmap"
)

// benchSource is a policycache.Source with one enforce policy per domain.
type benchSource struct{}

func (benchSource) LookupRecord(context.Context, string) (resolver.Record, error) {
	return resolver.Record{ID: "20260101"}, nil
}

func (benchSource) FetchPolicy(context.Context, string) (*resolver.Policy, error) {
	return &resolver.Policy{
		Mode:   resolver.ModeEnforce,
		MaxAge: 24 * time.Hour,
		MX:     []string{"mx1.example.com", "mx2.example.com", "*.backup.example.net"},
		Lines:  []string{"version: STSv1", "mode: enforce", "mx: mx1.example.com", "max_age: 86400"},
	}, nil
}

// benchDNS answers every MX lookup with an unauthenticated RRset, so DANE
// is none after one lookup, which the Checker caches.
type benchDNS struct{}

func (benchDNS) LookupMX(context.Context, string) ([]string, resolver.Answer, error) {
	return []string{"mx1.example.com"}, resolver.Answer{TTL: time.Hour}, nil
}

func (benchDNS) LookupTLSA(context.Context, string) ([]resolver.TLSA, resolver.Answer, error) {
	return nil, resolver.Answer{}, resolver.ErrNoRecord
}

// newCachedHandler returns a Handler over a real policy cache (and, with
// withDANE, a real DANE Checker), warmed for example.com.
func newCachedHandler(tb testing.TB, withDANE bool) *Handler {
	tb.Helper()
	log := slog.New(slog.NewTextHandler(io.Discard, nil))
	c := policycache.New(benchSource{}, policycache.Config{Logger: log})
	tb.Cleanup(c.Close)
	h := &Handler{
		Cache:    c,
		Settings: func(string) Settings { return Settings{Servername: true} },
		Logger:   log,
	}
	if withDANE {
		d := dane.New(benchDNS{}, dane.Config{Logger: log})
		tb.Cleanup(d.Close)
		h.DANE = d
	}
	ctx := context.Background()
	r := h.ServeSocketmap(ctx, "sts", "example.com")
	if r.Word != socketmap.WordOK {
		tb.Fatalf("warm-up: got %+v, want OK", r)
	}
	if withDANE {
		// The DANE check is cached once its lookup has committed.
		deadline := time.Now().Add(5 * time.Second)
		for {
			if lvl, err := h.DANE.Check(ctx, "example.com", 25, false); err == nil && lvl == dane.None {
				break
			}
			if time.Now().After(deadline) {
				tb.Fatal("warm-up: DANE check not cached")
			}
			time.Sleep(time.Millisecond)
		}
	}
	return h
}

const wantCachedAnswer = "secure match=mx1.example.com:mx2.example.com:.backup.example.net servername=hostname"

func benchServeCached(b *testing.B, withDANE bool) {
	h := newCachedHandler(b, withDANE)
	ctx := context.Background()
	b.ReportAllocs()
	for b.Loop() {
		r := h.ServeSocketmap(ctx, "sts", "example.com")
		if r.Data != wantCachedAnswer {
			b.Fatalf("got %q", r.Data)
		}
	}
}

func BenchmarkServeSocketmapCached(b *testing.B) {
	b.Run("dane", func(b *testing.B) { benchServeCached(b, true) })
	b.Run("nodane", func(b *testing.B) { benchServeCached(b, false) })
}

// BenchmarkServeConnCached is the whole request-to-reply path over TCP: a
// socketmap.Server with the handler of BenchmarkServeSocketmapCached.
func BenchmarkServeConnCached(b *testing.B) {
	h := newCachedHandler(b, true)
	s := &socketmap.Server{Handler: h, Logger: slog.New(slog.DiscardHandler)}
	l, err := socketmap.Listen("127.0.0.1:0", 0)
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
	payload := "sts example.com"
	req := []byte(strconv.Itoa(len(payload)) + ":" + payload + ",")
	resp := make([]byte, len(socketmap.AppendReply(nil, socketmap.OK(wantCachedAnswer))))
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

// Issue 7: a lookup of a cached domain allocates nothing in the handler,
// with DANE off or answering none from its cache.
func TestServeSocketmapCachedAllocs(t *testing.T) {
	for _, withDANE := range []bool{false, true} {
		h := newCachedHandler(t, withDANE)
		ctx := context.Background()
		allocs := testing.AllocsPerRun(100, func() {
			if r := h.ServeSocketmap(ctx, "sts", "example.com"); r.Data != wantCachedAnswer {
				t.Fatalf("got %q", r.Data)
			}
		})
		if allocs != 0 {
			t.Errorf("DANE %v: %v allocations per lookup, want 0", withDANE, allocs)
		}
	}
}
