// Package usersclient helps services that call users.v1.UserService: it verifies the
// service's access tokens locally, from the key set GetPublicKeys serves, and reads the
// ErrorInfo reason of a refused call.
package usersclient

import (
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"encoding/base64"
	"encoding/json"
	"errors"
	"fmt"
	"sync"
	"time"

	"github.com/golang-jwt/jwt/v5"

	usersv1 "github.com/users-grpc/users-grpc/clients/go/users/v1"
)

// Claims are what a verified access token says: see GetPublicKeys in the contract.
type Claims struct {
	Subject   string // the user id
	Role      string // RoleUser or RoleAdmin
	SessionID string
	Version   int64 // the user's token version: opaque here, the server checks it
	ID        string
	IssuedAt  time.Time
	ExpiresAt time.Time
}

// The only role values; any other is refused.
const (
	RoleUser  = "user"
	RoleAdmin = "admin"
)

// ErrInvalidToken wraps every reason a token is refused.
var ErrInvalidToken = errors.New("invalid access token")

// RefetchInterval bounds how often an unknown kid makes the verifier fetch the key set again,
// so a flood of tokens with made-up kids costs the service one call per interval.
const RefetchInterval = 5 * time.Second

// Verifier verifies access tokens with the service's public keys, which it fetches once,
// caches, and fetches again when a token names a key id it does not know (after a rotation).
//
// A locally verified token stays valid until it expires even if the user's tokens were revoked
// meanwhile (the server sees that through the `ver` claim; a local verifier cannot). Call
// ValidateToken instead where that matters.
type Verifier struct {
	client   usersv1.UserServiceClient
	issuer   string
	audience string
	leeway   time.Duration
	refetch  time.Duration

	mu        sync.Mutex
	keys      map[string]*ecdsa.PublicKey
	lastFetch time.Time
}

// NewVerifier verifies tokens of the given issuer and audience (USERS_JWT_ISSUER and
// USERS_JWT_AUDIENCE of the server).
func NewVerifier(client usersv1.UserServiceClient, issuer, audience string) *Verifier {
	return &Verifier{client: client, issuer: issuer, audience: audience, leeway: 5 * time.Second, refetch: RefetchInterval}
}

type tokenClaims struct {
	jwt.RegisteredClaims
	Role    string `json:"role"`
	Session string `json:"sid"`
	Version *int64 `json:"ver"`
}

// Verify checks the token's signature, type, issuer, audience and expiry, and that it carries
// every claim a user's token has; it returns the claims.
func (v *Verifier) Verify(ctx context.Context, token string) (*Claims, error) {
	var claims tokenClaims
	_, err := jwt.ParseWithClaims(token, &claims, func(t *jwt.Token) (any, error) {
		if typ, _ := t.Header["typ"].(string); typ != "at+jwt" {
			return nil, errors.New("not an access token")
		}
		kid, ok := t.Header["kid"].(string)
		if !ok {
			return nil, errors.New("no kid")
		}
		return v.key(ctx, kid)
	},
		jwt.WithValidMethods([]string{"ES256"}),
		jwt.WithIssuer(v.issuer),
		jwt.WithAudience(v.audience),
		jwt.WithExpirationRequired(),
		jwt.WithIssuedAt(),
		jwt.WithLeeway(v.leeway),
	)
	if err != nil {
		return nil, fmt.Errorf("%w: %w", ErrInvalidToken, err)
	}
	if claims.Subject == "" || claims.ID == "" || claims.Session == "" || claims.Version == nil || claims.IssuedAt == nil {
		return nil, fmt.Errorf("%w: a claim is missing", ErrInvalidToken)
	}
	if claims.Role != RoleUser && claims.Role != RoleAdmin {
		return nil, fmt.Errorf("%w: unknown role %q", ErrInvalidToken, claims.Role)
	}
	return &Claims{
		Subject:   claims.Subject,
		Role:      claims.Role,
		SessionID: claims.Session,
		Version:   *claims.Version,
		ID:        claims.ID,
		IssuedAt:  claims.IssuedAt.Time,
		ExpiresAt: claims.ExpiresAt.Time,
	}, nil
}

func (v *Verifier) key(ctx context.Context, kid string) (*ecdsa.PublicKey, error) {
	v.mu.Lock()
	defer v.mu.Unlock()
	if key, ok := v.keys[kid]; ok {
		return key, nil
	}
	if v.keys != nil && time.Since(v.lastFetch) < v.refetch {
		return nil, fmt.Errorf("unknown kid %q", kid)
	}
	keys, err := v.fetch(ctx)
	v.lastFetch = time.Now()
	if err != nil {
		return nil, fmt.Errorf("fetching the key set: %w", err)
	}
	v.keys = keys
	if key, ok := keys[kid]; ok {
		return key, nil
	}
	return nil, fmt.Errorf("unknown kid %q", kid)
}

type jwk struct {
	Kty string `json:"kty"`
	Crv string `json:"crv"`
	Kid string `json:"kid"`
	Alg string `json:"alg"`
	X   string `json:"x"`
	Y   string `json:"y"`
}

func (v *Verifier) fetch(ctx context.Context) (map[string]*ecdsa.PublicKey, error) {
	reply, err := v.client.GetPublicKeys(ctx, &usersv1.GetPublicKeysRequest{})
	if err != nil {
		return nil, err
	}
	var set struct {
		Keys []jwk `json:"keys"`
	}
	if err := json.Unmarshal([]byte(reply.GetJwksJson()), &set); err != nil {
		return nil, err
	}
	keys := make(map[string]*ecdsa.PublicKey, len(set.Keys))
	for _, k := range set.Keys {
		// Only the keys this service makes; anything else in the set is skipped, never trusted.
		if k.Kty != "EC" || k.Crv != "P-256" || k.Alg != "ES256" || k.Kid == "" {
			continue
		}
		x, errX := base64.RawURLEncoding.DecodeString(k.X)
		y, errY := base64.RawURLEncoding.DecodeString(k.Y)
		if errX != nil || errY != nil || len(x) != 32 || len(y) != 32 {
			continue
		}
		key, err := ecdsa.ParseUncompressedPublicKey(elliptic.P256(), append(append([]byte{4}, x...), y...))
		if err != nil {
			continue
		}
		keys[k.Kid] = key
	}
	return keys, nil
}
