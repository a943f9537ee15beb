package policystore

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"slices"
	"strings"
	"testing"
	"time"

	"stsmap/policycache"
	"stsmap/resolver"
)

// codecSample returns an entry with a policy and every field set.
func codecSample(domain string, fetched time.Time) *policycache.Entry {
	e := &policycache.Entry{
		Domain: domain, ID: "20240601T000000", Reason: policycache.ReasonPolicy,
		Policy: &resolver.Policy{
			Mode: resolver.ModeEnforce, MaxAge: 86400 * time.Second,
			MX: []string{"mx1." + domain, "*.mx." + domain},
			Lines: []string{"version: STSv1", "mode: enforce", "mx: mx1." + domain,
				"mx: *.mx." + domain, "max_age: 86400", "x-note: <a&b> \"q\"\t\u2028"},
		},
		Fetched:      fetched,
		Expires:      fetched.Add(86400 * time.Second),
		Checked:      fetched.Add(time.Hour),
		FailedID:     "20240701T000000",
		FailedAt:     fetched.Add(2 * time.Hour),
		FailingSince: fetched.Add(90 * time.Minute),
	}
	e.LastUsed.Store(fetched.Add(3 * time.Hour).Unix())
	return e
}

// codecDiff describes how got differs from want in what a store keeps, or
// is empty. Times compare with Equal: a stored time loses its monotonic
// reading and may come back in another location. A nil and an empty slice
// are the same.
func codecDiff(got, want *policycache.Entry) string {
	switch {
	case got == nil && want == nil:
		return ""
	case got == nil || want == nil:
		return fmt.Sprintf("got %v, want %v", got, want)
	}
	var d []string
	check := func(name string, ok bool, g, w any) {
		if !ok {
			d = append(d, fmt.Sprintf("%s: got %v, want %v", name, g, w))
		}
	}
	check("Domain", got.Domain == want.Domain, got.Domain, want.Domain)
	check("ID", got.ID == want.ID, got.ID, want.ID)
	check("Reason", got.Reason == want.Reason, got.Reason, want.Reason)
	check("Fetched", got.Fetched.Equal(want.Fetched), got.Fetched, want.Fetched)
	check("Expires", got.Expires.Equal(want.Expires), got.Expires, want.Expires)
	check("Checked", got.Checked.Equal(want.Checked), got.Checked, want.Checked)
	check("FailedID", got.FailedID == want.FailedID, got.FailedID, want.FailedID)
	check("FailedAt", got.FailedAt.Equal(want.FailedAt), got.FailedAt, want.FailedAt)
	check("FailingSince", got.FailingSince.Equal(want.FailingSince), got.FailingSince, want.FailingSince)
	check("LastUsed", got.LastUsed.Load() == want.LastUsed.Load(), got.LastUsed.Load(), want.LastUsed.Load())
	gp, wp := got.Policy, want.Policy
	switch {
	case gp == nil || wp == nil:
		check("Policy", gp == wp, gp, wp)
	default:
		check("Mode", gp.Mode == wp.Mode, gp.Mode, wp.Mode)
		check("MaxAge", gp.MaxAge == wp.MaxAge, gp.MaxAge, wp.MaxAge)
		check("MX", slices.Equal(gp.MX, wp.MX), gp.MX, wp.MX)
		check("Lines", slices.Equal(gp.Lines, wp.Lines), gp.Lines, wp.Lines)
	}
	return strings.Join(d, "; ")
}

func TestCodecRoundTrip(t *testing.T) {
	fetched := time.Date(2024, 6, 1, 12, 0, 0, 123456789, time.FixedZone("CEST", 2*3600))
	none := &policycache.Entry{Domain: "none.example", ID: "1", Reason: policycache.ReasonPolicy,
		Policy:  &resolver.Policy{Mode: resolver.ModeNone, MaxAge: 0},
		Fetched: fetched, Expires: fetched}
	// The largest body the parser accepts, every value byte escaped by
	// JSON to six bytes: it must still load (maxRecordSize).
	body := "version: STSv1\nmode: testing\nmx: mx.example\nmax_age: 31557600\nx: "
	body += strings.Repeat("<", resolver.MaxPolicySize-len(body))
	big, err := resolver.ParsePolicy([]byte(body))
	if err != nil {
		t.Fatalf("ParsePolicy(64 KiB): %v", err)
	}
	bigEntry := &policycache.Entry{Domain: "big.example", ID: "2", Reason: policycache.ReasonPolicy,
		Policy: big, Fetched: fetched, Expires: fetched.Add(big.MaxAge)}

	for _, tc := range []struct {
		name string
		e    *policycache.Entry
	}{
		{"all fields", codecSample("example.com", fetched)},
		{"mode none, no mx", none},
		{"largest body, escaped", bigEntry},
	} {
		t.Run(tc.name, func(t *testing.T) {
			b, err := Encode(tc.e)
			if err != nil {
				t.Fatalf("Encode: %v", err)
			}
			got, err := Decode(b)
			if err != nil {
				t.Fatalf("Decode: %v", err)
			}
			if d := codecDiff(got, tc.e); d != "" {
				t.Errorf("round trip: %s", d)
			}
		})
	}
}

func TestEncodeRefuses(t *testing.T) {
	now := time.Unix(1700000000, 0)
	noPolicy := &policycache.Entry{Domain: "example.com", Reason: policycache.ReasonNoRecord, Fetched: now, Expires: now}
	huge := codecSample("example.com", now)
	huge.Policy.Lines = []string{"x: " + strings.Repeat("<", maxRecordSize/6+1)}
	for _, tc := range []struct {
		name string
		e    *policycache.Entry
	}{
		{"no policy", noPolicy},
		{"larger than a record may be", huge},
	} {
		t.Run(tc.name, func(t *testing.T) {
			if b, err := Encode(tc.e); err == nil {
				t.Errorf("Encode = %d bytes, nil error; want an error", len(b))
			}
		})
	}
}

func TestDecodeRejects(t *testing.T) {
	valid := func(edit func(m map[string]any)) string {
		m := map[string]any{"v": 1, "domain": "example.com", "id": "1", "mode": "enforce",
			"max_age": 86400, "mx": []string{"mx.example.com"},
			"fetched": "2024-06-01T00:00:00Z", "expires": "2024-06-02T00:00:00Z"}
		edit(m)
		b, err := json.Marshal(m)
		if err != nil {
			t.Fatal(err)
		}
		return string(b)
	}
	if _, err := Decode([]byte(valid(func(map[string]any) {}))); err != nil {
		t.Fatalf("Decode(valid record) = %v", err)
	}
	for _, tc := range []struct {
		name string
		in   string
	}{
		{"not JSON", "\x00\xffgarbage"},
		{"empty", ""},
		{"JSON null", "null"},
		{"other version", valid(func(m map[string]any) { m["v"] = 2 })},
		{"no domain", valid(func(m map[string]any) { delete(m, "domain") })},
		{"long domain", valid(func(m map[string]any) { m["domain"] = strings.Repeat("a", 254) })},
		{"long id", valid(func(m map[string]any) { m["id"] = strings.Repeat("1", 33) })},
		{"long failed id", valid(func(m map[string]any) { m["failed_id"] = strings.Repeat("1", 33) })},
		{"negative max_age", valid(func(m map[string]any) { m["max_age"] = -1 })},
		{"max_age over a year", valid(func(m map[string]any) { m["max_age"] = 31557601 })},
		// 9223372037 s overflows time.Duration to a negative value.
		{"max_age overflowing", valid(func(m map[string]any) { m["max_age"] = int64(9223372037) })},
		{"expires before fetched", valid(func(m map[string]any) { m["expires"] = "2024-05-31T23:59:59Z" })},
		{"bad mode", valid(func(m map[string]any) { m["mode"] = "Enforce" })},
		{"enforce without mx", valid(func(m map[string]any) { delete(m, "mx") })},
		{"empty mx", valid(func(m map[string]any) { m["mx"] = []string{""} })},
		{"long mx", valid(func(m map[string]any) { m["mx"] = []string{strings.Repeat("a", 256)} })},
		{"bad time", valid(func(m map[string]any) { m["fetched"] = strings.Repeat("x", 10000) })},
		{"too large", valid(func(m map[string]any) { m["lines"] = []string{strings.Repeat("a", maxRecordSize)} })},
	} {
		t.Run(tc.name, func(t *testing.T) {
			e, err := Decode([]byte(tc.in))
			if !errors.Is(err, ErrCorrupt) {
				t.Fatalf("Decode = %v, %v; want an error wrapping ErrCorrupt", e, err)
			}
			// SPEC 8.3: the text may be logged.
			if n := len(err.Error()); n > 512 {
				t.Errorf("error text is %d bytes long, want at most 512", n)
			}
		})
	}
}

// FuzzDecode checks that Decode never panics, that its errors wrap
// ErrCorrupt and stay short (SPEC 8.3), and that whatever it accepts
// encodes and decodes again to the same values and the same bytes.
func FuzzDecode(f *testing.F) {
	for _, e := range []*policycache.Entry{
		codecSample("example.com", time.Date(2024, 6, 1, 0, 0, 0, 0, time.UTC)),
		codecSample("xn--bcher-kva.example", time.Date(2024, 6, 1, 0, 0, 0, 1, time.FixedZone("", -9000))),
	} {
		b, err := Encode(e)
		if err != nil {
			f.Fatal(err)
		}
		f.Add(b)
	}
	f.Fuzz(func(t *testing.T, in []byte) {
		e, err := Decode(in)
		if err != nil {
			if !errors.Is(err, ErrCorrupt) {
				t.Fatalf("Decode error %v does not wrap ErrCorrupt", err)
			}
			if n := len(err.Error()); n > 512 {
				t.Fatalf("error text is %d bytes long", n)
			}
			return
		}
		b, err := Encode(e)
		if err != nil {
			t.Fatalf("Encode(Decode(in)): %v", err)
		}
		e2, err := Decode(b)
		if err != nil {
			t.Fatalf("Decode(Encode(Decode(in))): %v\nrecord: %s", err, b)
		}
		if d := codecDiff(e2, e); d != "" {
			t.Fatalf("values changed by re-encoding: %s", d)
		}
		if b2, err := Encode(e2); err != nil || !bytes.Equal(b2, b) {
			t.Fatalf("encoding not stable:\n%s\n%s (%v)", b, b2, err)
		}
	})
}
