// Package policystore keeps MTA-STS policies beyond the process: Bolt, an
// embedded bbolt file so that a restart loses no policy, and Redis, a
// shared server so that a fleet of MTAs shares what any of them learned.
// Both implement policycache.Store.
package policystore

import (
	"encoding/json"
	"errors"
	"fmt"
	"time"

	"stsmap/policycache"
	"stsmap/resolver"
)

// ErrCorrupt is returned for a stored record that does not decode.
var ErrCorrupt = errors.New("policystore: corrupt record")

// recordVersion is the format of stored records; a new format gets a new
// number and Decode keeps reading the old ones.
const recordVersion = 1

// maxRecordSize bounds a stored record. A policy body is at most 64 KiB
// (SPEC 4.5), kept both as lines and as mx patterns; JSON escapes "<", ">"
// and "&" in a line as six bytes each ("\u003c"), so the lines of a valid
// body can take six times its size and its mx patterns once more. Encode
// refuses a larger record, so that what is stored always loads.
const maxRecordSize = 8 * resolver.MaxPolicySize

// record is an entry as stored: JSON, so that an operator can read it with
// bbolt's or Redis's own tools.
type record struct {
	V        int       `json:"v"`
	Domain   string    `json:"domain"`
	ID       string    `json:"id"`
	Mode     string    `json:"mode"`
	MaxAge   int64     `json:"max_age"` // seconds
	MX       []string  `json:"mx,omitempty"`
	Lines    []string  `json:"lines,omitempty"`
	Fetched  time.Time `json:"fetched"`
	Expires  time.Time `json:"expires"`
	Checked  time.Time `json:"checked,omitzero"`
	LastUsed int64     `json:"last_used,omitempty"` // Unix seconds
	FailedID string    `json:"failed_id,omitempty"`
	FailedAt time.Time `json:"failed_at,omitzero"`
	// FailingSince is absent from records written before it existed.
	FailingSince time.Time `json:"failing_since,omitzero"`
}

// Encode renders an entry with a policy for storage.
func Encode(e *policycache.Entry) ([]byte, error) {
	if e.Policy == nil {
		return nil, fmt.Errorf("policystore: %s: only entries with a policy are stored", e.Domain)
	}
	b, err := json.Marshal(record{
		V: recordVersion, Domain: e.Domain, ID: e.ID,
		Mode: string(e.Policy.Mode), MaxAge: int64(e.Policy.MaxAge / time.Second),
		MX: e.Policy.MX, Lines: e.Policy.Lines,
		Fetched: e.Fetched, Expires: e.Expires, Checked: e.Checked,
		LastUsed: e.LastUsed.Load(), FailedID: e.FailedID, FailedAt: e.FailedAt,
		FailingSince: e.FailingSince,
	})
	if err == nil && len(b) > maxRecordSize {
		err = fmt.Errorf("policystore: %s: record of %d bytes is larger than %d", clip(e.Domain), len(b), maxRecordSize)
	}
	if err != nil {
		return nil, err
	}
	return b, nil
}

// Decode reads a stored entry, checking what a damaged or foreign record
// could get wrong; errors wrap ErrCorrupt.
func Decode(b []byte) (*policycache.Entry, error) {
	if len(b) > maxRecordSize {
		return nil, fmt.Errorf("%w: %d bytes", ErrCorrupt, len(b))
	}
	var r record
	if err := json.Unmarshal(b, &r); err != nil {
		return nil, fmt.Errorf("%w: %s", ErrCorrupt, bound(err.Error()))
	}
	if err := r.check(); err != nil {
		return nil, fmt.Errorf("%w: %s: %v", ErrCorrupt, clip(r.Domain), err)
	}
	e := &policycache.Entry{
		Domain: r.Domain, ID: r.ID, Reason: policycache.ReasonPolicy,
		Policy: &resolver.Policy{
			Mode: resolver.Mode(r.Mode), MaxAge: time.Duration(r.MaxAge) * time.Second,
			MX: r.MX, Lines: r.Lines,
		},
		Fetched: r.Fetched, Expires: r.Expires, Checked: r.Checked,
		FailedID: r.FailedID, FailedAt: r.FailedAt, FailingSince: r.FailingSince,
	}
	e.LastUsed.Store(r.LastUsed)
	return e, nil
}

func (r *record) check() error {
	switch {
	case r.V != recordVersion:
		return fmt.Errorf("unknown record version %d", r.V)
	case r.Domain == "" || len(r.Domain) > 253:
		return errors.New("bad domain")
	case len(r.ID) > 32 || len(r.FailedID) > 32:
		return errors.New("bad id")
	// Compared in seconds: a huge max_age would overflow time.Duration and
	// pass as a negative or small value.
	case r.MaxAge < 0 || r.MaxAge > int64(resolver.MaxMaxAge/time.Second):
		return errors.New("bad max_age")
	case r.Expires.Before(r.Fetched):
		return errors.New("expires before fetched")
	}
	switch resolver.Mode(r.Mode) {
	case resolver.ModeEnforce, resolver.ModeTesting:
		if len(r.MX) == 0 {
			return errors.New("no mx")
		}
	case resolver.ModeNone:
	default:
		return errors.New("bad mode")
	}
	for _, m := range r.MX {
		if m == "" || len(m) > 255 {
			return errors.New("bad mx")
		}
	}
	return nil
}

// clip bounds text from a record in an error message (SPEC 8.3).
func clip(s string) string {
	if len(s) > 64 {
		return fmt.Sprintf("%q...", s[:64])
	}
	return fmt.Sprintf("%q", s)
}

// maxLogText bounds error text and text from a store in an error message
// or log line (SPEC 8.3).
const maxLogText = 200

// bound limits text from a record, from Redis or from an error (SPEC 8.3):
// encoding/json and time quote the offending value whole, and a damaged
// record's value may be large.
func bound(s string) string {
	if len(s) > maxLogText {
		return s[:maxLogText] + "..."
	}
	return s
}
